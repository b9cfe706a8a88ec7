# Around the runs (issue 23): general-ability forgetting with lm-evaluation-harness (the
# config's `lm_eval`, off by default), model cards with evaluation results, and training
# curves drawn from the tracker's TensorBoard runs. None of these feeds another stage.

rule lm_eval:
    input:
        models=P.final_checkpoints,
    output:
        [directory(f"{R}/lm_eval/{{method}}/seed{s}") for s in SEEDS],
    params:
        p=cfg("lm_eval") if LM_EVAL else "{}",
    log:
        f"{R}/logs/lm_eval/{{method}}.log",
    threads: 1
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gradloc lm-eval --params {params.p:q} --model {input.models} --out {output} > {log} 2>&1"


rule lm_eval_base:
    input:
        model=rules.base_model.output[0],
    output:
        directory(f"{R}/lm_eval/base"),
    params:
        p=cfg("lm_eval") if LM_EVAL else "{}",
    log:
        f"{R}/logs/lm_eval/base.log",
    threads: 1
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gradloc lm-eval --params {params.p:q} --model {input.model} --method base --out {output} > {log} 2>&1"


rule general_ability:
    input:
        base=rules.lm_eval_base.output[0],
        evals=[f"{R}/lm_eval/{m}/seed{s}" for m in METHODS for s in SEEDS],
    output:
        csv=report(f"{R}/extras/general_ability.csv", caption="../report/general_ability.rst",
                   category="General ability", labels={"figure": "general ability (CSV)"}),
        md=report(f"{R}/extras/general_ability.md", caption="../report/general_ability.rst",
                  category="General ability", labels={"figure": "general ability (Markdown)"}),
    params:
        out=lambda w, output: os.path.dirname(output.csv),
    log:
        f"{R}/logs/general_ability.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gradloc general-ability --evals {input.base} {input.evals} --out {params.out} > {log} 2>&1"


rule model_cards:
    input:
        evals=P.report_evals,
        trains=P.report_trains,
    output:
        directory(f"{R}/model_cards"),
    log:
        f"{R}/logs/model_cards.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m gradloc model-cards --trains {input.trains} --evals {input.evals} --out {output} > {log} 2>&1"


rule tracked_curves:
    input:
        trains=P.report_trains,
        others=P.tracked_inputs,
    output:
        **{k: report(f"{R}/extras/tracked_{k}.png", caption=f"../report/tracked_{k}.rst", category="Training",
                     labels={"figure": f"tracked {k} curves"}) for k in ("train", "pretrain", "subnet", "camels")},
    params:
        # the figures' resolution only: a report title reruns the report alone
        p=json.dumps({"dpi": config["report"].get("dpi", 120)}),
        tracking=TRACKING["dir"],
        out=lambda w, output: os.path.dirname(output.train),
    log:
        f"{R}/logs/tracked_curves.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m gradloc tracked-curves --params {params.p:q} --tracking {params.tracking} --trains {input.trains}"
        " --out {params.out} > {log} 2>&1"
