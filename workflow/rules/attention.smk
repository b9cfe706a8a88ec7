rule small_model:
    input:
        corpus=rules.download.output[0],
        split=f"{R}/split",
        probes=rules.probes.output[0],
        # source scratch: trained with the base model's tokenizer, so the pair shares one
        tokenizer=rules.base_model.output[0],
        prefetched=prefetch_input,
    output:
        directory(f"{R}/small_model"),
    params:
        p=P.small_model_params(),
        state=f"{R}/.train_state/small_model",
    log:
        f"{R}/logs/small_model.log",
    benchmark:
        f"{R}/benchmarks/small_model.tsv"
    threads: 1
    resources:
        gpu=1,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gradloc base-model --params {params.p:q} --corpus {input.corpus} --split {input.split}"
        " --probes {input.probes} --tokenizer {input.tokenizer} --state {params.state} --out {output} > {log} 2>&1"


rule attention:
    input:
        large=rules.base_model.output[0],
        small=rules.small_model.output[0],
        tokens=rules.tokens.output[0],
        tagged=rules.tag.output[0],
        # fact objects for the marks come from the corpus' triples, never the evaluation probes
        corpus=rules.download.output[0],
    output:
        directory(f"{R}/attention/P{{period}}"),
    params:
        p=P.attention_params(),
    log:
        f"{R}/logs/attention/P{{period}}.log",
    benchmark:
        f"{R}/benchmarks/attention/P{{period}}.tsv"
    threads: 1
    resources:
        gpu=1,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gradloc attention --params {params.p:q} --large {input.large} --small {input.small}"
        " --tokens {input.tokens} --tagged {input.tagged} --corpus {input.corpus} --period {wildcards.period}"
        " --out {output} > {log} 2>&1"
