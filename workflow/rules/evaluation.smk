# One job per method and period evaluates the checkpoints of every seed: a process pays
# ~4 s of torch/transformers imports, three times what a small model's evaluation costs.
# A GPU for a hub (pretrained/gguf) model, none for a small scratch model (the CPU default).
EVAL_GPUS = 0 if config["model"]["source"] == "scratch" else 1


rule evaluate:
    input:
        models=P.method_checkpoints,
        probes=rules.probes.output[0],
        tokens=rules.tokens.output[0],
    output:
        [directory(f"{R}/eval/{{method}}/seed{s}/P{{period}}") for s in SEEDS],
    params:
        p=cfg("evaluate"),
    log:
        f"{R}/logs/eval/{{method}}/P{{period}}.log",
    # One thread per job: small models scale badly past one core, two jobs in parallel do not.
    threads: 1
    resources:
        gpu=EVAL_GPUS,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gradloc evaluate --params {params.p:q} --model {input.models} --probes {input.probes}"
        " --tokens {input.tokens} --period {wildcards.period} --out {output} > {log} 2>&1"


rule evaluate_base:
    input:
        model=rules.base_model.output[0],
        probes=rules.probes.output[0],
        tokens=rules.tokens.output[0],
    output:
        directory(f"{R}/eval/base/P{{period}}"),
    params:
        p=cfg("evaluate"),
    log:
        f"{R}/logs/eval/base/P{{period}}.log",
    # One thread per job: small models scale badly past one core, two jobs in parallel do not.
    threads: 1
    resources:
        gpu=EVAL_GPUS,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gradloc evaluate --params {params.p:q} --model {input.model} --probes {input.probes}"
        " --tokens {input.tokens} --period {wildcards.period} --method base --out {output} > {log} 2>&1"
