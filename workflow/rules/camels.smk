rule metatrain:
    input:
        base=rules.base_model.output[0],
        # the weighting model's backbone: the small model (the base model's tokenizer)
        backbone=rules.small_model.output[0],
        tokens=rules.tokens.output[0],
        tagged=rules.tag.output[0],
        probes=rules.probes.output[0],
    output:
        directory(f"{R}/weighting_model"),
    params:
        p=cfg("camels"),
    log:
        f"{R}/logs/metatrain.log",
    benchmark:
        f"{R}/benchmarks/metatrain.tsv"
    threads: 1
    resources:
        gpu=1,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gradloc metatrain --params {params.p:q} --base {input.base} --backbone {input.backbone}"
        " --tokens {input.tokens} --tagged {input.tagged} --probes {input.probes} --out {output} > {log} 2>&1"
