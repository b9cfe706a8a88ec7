rule train:
    input:
        # what the method's parts read (gradloc.parts: selection, attention, subnet, ...)
        unpack(lambda w: P.method_inputs(w.method, w.period)),
        init=P.previous_checkpoint,
        tokens=rules.tokens.output[0],
    # One job per (method, seed, period), or per (method, period) with train.group_seeds.
    output:
        [directory(p) for p in P.train_pattern("train")],
    params:
        p=lambda w: P.train_params(w.method),
        # The part inputs' flags, in four groups so that the shell command below stays the
        # one earlier versions ran (Snakemake reruns a job whose rule's command changed).
        selection=lambda w, input: P.input_args(input, ["selection"]),
        attention=lambda w, input: P.input_args(input, ["attention"]),
        subnet=lambda w, input: P.input_args(input, ["subnet"]),
        weighting=lambda w, input: P.input_args(input, ["tagged", "corpus", "weighting_model"]),
        # Resumable state lives outside the output, which Snakemake deletes after a failure.
        state=lambda w: [p.format(**dict(w.items())) for p in P.train_pattern(".train_state")],
        seeds=lambda w: " ".join(map(str, P.job_seeds(w))),
        # `gpu: N` (e.g. --set-resources train:gpu=4) trains data-parallel on N GPUs.
        launcher=lambda w, resources: P.launcher(resources.gpu),
    log:
        P.train_job_path("logs/train", ".log"),
    benchmark:
        P.train_job_path("benchmarks/train", ".tsv")
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
