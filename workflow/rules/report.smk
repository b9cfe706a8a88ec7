rule report:
    input:
        evals=report_evals,
        trains=report_trains,
        profile=rules.profile.output[0],
        base_model=rules.base_model.output[0],
    output:
        table_csv=f"{R}/report/table.csv",
        table_md=report(f"{R}/report/table.md", category="Results"),
        heatmap=report(f"{R}/report/heatmap.png", category="Gradient profile"),
        tradeoff=report(f"{R}/report/tradeoff.png", category="Results"),
        curves=report(f"{R}/report/curves.png", category="Training"),
    params:
        p=cfg("report"),
        out=lambda w, output: os.path.dirname(output.table_csv),
    log:
        f"{R}/logs/report.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m gradloc report --params {params.p:q} --evals {input.evals} --trains {input.trains}"
        " --profile {input.profile} --base-model {input.base_model} --out {params.out} > {log} 2>&1"
