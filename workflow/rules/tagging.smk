rule tag:
    input:
        corpus=rules.download.output[0],
        split=f"{R}/split",
    output:
        directory(f"{R}/tagged"),
    params:
        p=cfg("tagging"),
    log:
        f"{R}/logs/tag.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m gradloc tag --params {params.p:q} --corpus {input.corpus} --split {input.split}"
        " --out {output} > {log} 2>&1"


rule probes:
    input:
        corpus=rules.download.output[0],
        tagged=rules.tag.output[0],
    output:
        directory(f"{R}/probes"),
    params:
        p=cfg("probes"),
    log:
        f"{R}/logs/probes.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m gradloc probes --params {params.p:q} --corpus {input.corpus} --tagged {input.tagged}"
        " --out {output} > {log} 2>&1"
