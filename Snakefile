# gradloc: gradient-localized lifelong pretraining. This file is only the table of
# contents; the logic lives in workflow/rules/*.smk and in the gradloc library.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless --configfile names another (Snakemake would deep-merge
# the two, and the default's methods would leak into e.g. config/test.yaml).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prefetch.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tagging.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/profiling.smk"
include: "workflow/rules/selection.smk"
include: "workflow/rules/attention.smk"
include: "workflow/rules/camels.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/extras.smk"


rule all:
    input:
        P.all_targets(),
        P.extra_targets(TRACKING["backend"]),
    default_target: True


rule data:
    input:
        P.data_targets(),
