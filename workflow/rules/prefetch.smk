# Offline compute nodes: `prefetch` runs on the submitting host (a local rule) and fills
# the Hugging Face cache with the data release and hub models, once; every other job runs
# with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 from that cache ($GRADLOC_CACHE, else
# <results>/hf_cache). Configs with only local or scratch inputs fetch nothing and are
# left as they are (no prefetch job, no environment change). Settings: gradloc.workflow.environment.
localrules:
    prefetch,


rule prefetch:
    output:
        f"{R}/prefetch.json",
    params:
        p=json.dumps({"data": config["data"], "models": PREFETCH_MODELS}, sort_keys=True, separators=(",", ":")),
    log:
        f"{R}/logs/prefetch.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 python -m gradloc prefetch --params {params.p:q} --out {output}"
        " > {log} 2>&1"
