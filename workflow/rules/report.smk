rule report:
    input:
        evals=P.report_evals,
        trains=P.report_trains,
        profile=rules.profile.output[0],
        selection=rules.select.output[0],
        subnet=rules.subnet.output[0],
        base_model=rules.base_model.output[0],
        weighting=lambda w: [f"{R}/weighting_model"] if P.uses("weighting_model") else [],
    # report(...) marks what `snakemake --report report.html` embeds; captions are
    # relative to this file.
    output:
        table_csv=report(f"{R}/report/table.csv", caption="../report/table.rst", category="Results",
                         labels={"figure": "table (CSV)"}),
        table_md=report(f"{R}/report/table.md", caption="../report/table.rst", category="Results",
                        labels={"figure": "table (Markdown)"}),
        fact_tradeoff=report(f"{R}/report/fact_tradeoff.png", caption="../report/fact_tradeoff.rst",
                             category="Results", labels={"figure": "fact-level uptake vs forgetting"}),
        heatmap=report(f"{R}/report/heatmap.png", caption="../report/heatmap.rst", category="Gradient profile",
                       labels={"figure": "relative gradient norm"}),
        tradeoff=report(f"{R}/report/tradeoff.png", caption="../report/tradeoff.rst", category="Results",
                        labels={"figure": "uptake vs forgetting"}),
        localization=report(f"{R}/report/localization.png", caption="../report/localization.rst",
                            category="Gradient profile", labels={"figure": "mask density vs gradient norm"}),
        curves=report(f"{R}/report/curves.png", caption="../report/curves.rst", category="Training",
                      labels={"figure": "training loss"}),
    params:
        p=cfg("report"),
        out=lambda w, output: os.path.dirname(output.table_csv),
        weighting=lambda w, input: f"--weighting {input.weighting[0]}" if input.weighting else "",
    log:
        f"{R}/logs/report.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m gradloc report --params {params.p:q} --evals {input.evals} --trains {input.trains}"
        " --profile {input.profile} --subnet {input.subnet} --base-model {input.base_model} {params.weighting} --selection {input.selection} --out {params.out} > {log} 2>&1"
