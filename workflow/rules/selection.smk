rule select:
    input:
        profile=rules.profile.output[0],
    output:
        f"{R}/select/selection.json",
    params:
        p=cfg("select"),
    log:
        f"{R}/logs/select.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m gradloc select --params {params.p:q} --profile {input.profile} --out {output} > {log} 2>&1"
