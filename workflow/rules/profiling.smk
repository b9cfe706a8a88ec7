rule profile:
    input:
        model=rules.base_model.output[0],
        tokens=rules.tokens.output[0],
        probes=rules.probes.output[0],
        tagged=rules.tag.output[0],
        # the sequences' entities (titles) and, with salient: object, the updated objects
        # (triples); never the evaluation probes' answers
        corpus=rules.download.output[0],
    output:
        directory(f"{R}/profile"),
    params:
        p=cfg("profile"),
    log:
        f"{R}/logs/profile.log",
    benchmark:
        f"{R}/benchmarks/profile.tsv"
    threads: 2
    resources:
        gpu=1,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gradloc profile --params {params.p:q} --model {input.model} --tokens {input.tokens}"
        " --probes {input.probes} --tagged {input.tagged} --corpus {input.corpus} --out {output} > {log} 2>&1"


rule subnet:
    input:
        model=rules.base_model.output[0],
        # subnet.facts: corpus (default): facts from the triples; the probes give only the
        # subjects to leave out (those the methods are evaluated on)
        corpus=rules.download.output[0],
        probes=rules.probes.output[0],
        tokens=rules.tokens.output[0],
    output:
        directory(f"{R}/subnet"),
    params:
        p=cfg("subnet"),
    log:
        f"{R}/logs/subnet.log",
    benchmark:
        f"{R}/benchmarks/subnet.tsv"
    threads: 2
    resources:
        gpu=1,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gradloc subnet --params {params.p:q} --model {input.model} --corpus {input.corpus}"
        " --probes {input.probes} --tokens {input.tokens} --out {output} > {log} 2>&1"
