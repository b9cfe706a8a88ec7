rule base_model:
    input:
        corpus=rules.download.output[0],
        split=f"{R}/split",
        probes=rules.probes.output[0],
        prefetched=prefetch_input,
    output:
        directory(f"{R}/base_model"),
    params:
        p=cfg("model"),
        # Resumable state lives outside the output, which Snakemake deletes after a failure.
        state=f"{R}/.train_state/base_model",
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
        " --probes {input.probes} --state {params.state} --out {output} > {log} 2>&1"


rule tokens:
    input:
        model=rules.base_model.output[0],
        tagged=rules.tag.output[0],
    output:
        directory(f"{R}/tokens"),
    log:
        f"{R}/logs/tokens.log",
    benchmark:
        f"{R}/benchmarks/tokens.tsv"
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gradloc tokens --model {input.model} --tagged {input.tagged} --out {output} > {log} 2>&1"
