rule base_model:
    input:
        corpus=rules.download.output[0],
        split=f"{R}/split",
        probes=rules.probes.output[0],
    output:
        directory(f"{R}/base_model"),
    params:
        p=cfg("model"),
    log:
        f"{R}/logs/base_model.log",
    benchmark:
        f"{R}/benchmarks/base_model.tsv"
    threads: 2
    resources:
        gpu=1,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gradloc base-model --params {params.p:q} --corpus {input.corpus} --split {input.split}"
        " --probes {input.probes} --out {output} > {log} 2>&1"
