rule train:
    input:
        unpack(weighting_inputs),
        init=previous_checkpoint,
        tokens=rules.tokens.output[0],
        selection=selection_input,
        attention=attention_input,
        subnet=subnet_input,
    # One job per (method, seed, period), or per (method, period) with train.group_seeds.
    output:
        [directory(p) for p in train_pattern("train")],
    params:
        p=lambda w: train_params(w.method),
        selection=lambda w, input: f"--selection {input.selection[0]}" if input.selection else "",
        attention=lambda w, input: f"--attention {input.attention[0]}" if input.attention else "",
        subnet=lambda w, input: f"--subnet {input.subnet[0]}" if input.subnet else "",
        weighting=weighting_args,
        # Resumable state lives outside the output, which Snakemake deletes after a failure.
        state=lambda w: [p.format(**dict(w.items())) for p in train_pattern(".train_state")],
        seeds=lambda w: " ".join(map(str, job_seeds(w))),
        # `gpu: N` (e.g. --set-resources train:gpu=4) trains data-parallel on N GPUs.
        launcher=lambda w, resources: launcher(resources.gpu),
    log:
        train_job_path("logs/train", ".log"),
    benchmark:
        train_job_path("benchmarks/train", ".tsv")
    # One thread per job: small models scale badly past one core, two jobs in parallel do not.
    threads: 1
    resources:
        gpu=1,
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.launcher} train --params {params.p:q} --init {input.init} --tokens {input.tokens}"
        " {params.selection} {params.attention} {params.subnet} {params.weighting}"
        " --period {wildcards.period} --seed {params.seeds}"
        " --state {params.state} --gpus {resources.gpu} --out {output} > {log} 2>&1"
