rule download:
    input:
        prefetch_input,
    output:
        directory(f"{R}/corpus"),
    params:
        p=P.data_params(),
    log:
        f"{R}/logs/download.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m gradloc download --params {params.p:q} --out {output} > {log} 2>&1"


checkpoint split:
    input:
        corpus=rules.download.output[0],
    output:
        directory(f"{R}/split"),
    params:
        p=cfg("split"),
    log:
        f"{R}/logs/split.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m gradloc split --params {params.p:q} --corpus {input.corpus} --out {output} > {log} 2>&1"
