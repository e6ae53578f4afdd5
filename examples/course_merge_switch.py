"""PEFT course, merging and switching adapters on SmolLM2-135M-Instruct (CPU).

Trains two LoRA adapters on the same questions with two personas (the demo's pirate answers, and the same answers
as a terse robot), then shows what each way of serving them answers: switching the active adapter, one batch with a
different adapter per row, a weighted combination of the two, the base model with adapters off, and the pirate
adapter merged into the weights (same answers, no adapter left). Writes a Markdown table:

    python examples/course_merge_switch.py                        # about 3 minutes on 2 cores
    python examples/course_merge_switch.py --smoke --out /tmp/x   # two steps each
"""

from __future__ import annotations

from course_common import arguments, smollm2, write_table

QUESTIONS = ["What is 7 plus 5?", "What is 20 plus 13?"]


def robot(response: str) -> str:
    """The pirate answer in the robot persona: 'Arr! 1 plus 8 be 9, matey.' -> 'BEEP. 1 PLUS 8 = 9.'"""
    core = response.replace("Arr! ", "").split(", matey")[0]
    return "BEEP. " + core.replace(" be ", " = ").upper() + "."


def main() -> None:
    args, steps = arguments(__doc__, 40)

    import torch
    from transformers import AutoModelForCausalLM

    from graftkit import LoraConfig, get_peft_model, sft
    from graftkit.demo import demo_pairs

    path, tokenizer, _, _ = smollm2()
    pirate = demo_pairs()
    personas = {"pirate": pirate, "robot": [(p, robot(r)) for p, r in pirate]}
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
                           adapter_name="pirate")
    model.add_adapter("robot", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, pairs in personas.items():
        model.set_adapter(name)
        sft.train(model, tokenizer, pairs, steps=steps, batch_size=8, lr=2e-3, seed=0, progress=False)
    rows = []

    def answer(label: str, **kwargs) -> None:
        rows.append((label, [sft.generate(model, tokenizer, q, max_new_tokens=20) for q in QUESTIONS]
                     if not kwargs else kwargs["answers"]))

    for name in ("pirate", "robot"):
        model.set_adapter(name)
        answer(f"set_adapter('{name}')")
    ids = [torch.tensor(sft.prompt_ids(tokenizer, q)) for q in QUESTIONS]
    width = max(len(i) for i in ids)  # left-pad the two questions into one batch, one adapter per row
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = torch.stack([torch.cat([torch.full((width - len(i),), pad), i]) for i in ids])
    mask = (torch.arange(width)[None, :] >= (width - torch.tensor([len(i) for i in ids]))[:, None]).long()
    with torch.no_grad():
        out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=20, do_sample=False,
                             pad_token_id=pad, adapter_names=["pirate", "robot"])
    answer("one batch: row 1 pirate, row 2 robot",
           answers=[tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out])
    model.add_weighted_adapter(["pirate", "robot"], [0.5, 0.5], "blend", combination_type="cat")
    model.set_adapter("blend")
    answer("add_weighted_adapter: 0.5 pirate + 0.5 robot (cat)")
    with model.disable_adapter():
        answer("disable_adapter(): the base model")
    model.set_adapter("pirate")
    before = [sft.generate(model, tokenizer, q, max_new_tokens=20) for q in QUESTIONS]
    merged = model.merge_and_unload(adapter_names=["pirate"])
    after = [sft.generate(merged, tokenizer, q, max_new_tokens=20) for q in QUESTIONS]
    rows.append(("merge_and_unload(['pirate']): a plain model", after))
    table = ["| how | " + " | ".join(QUESTIONS) + " |", "|---|" + "---|" * len(QUESTIONS)]
    table += [f"| {label} | " + " | ".join(a.replace("|", "/") for a in answers) + " |" for label, answers in rows]
    write_table(args.out, "merge_switch", "course_merge_switch.py", args, steps, table)
    print(f"merged answers equal the adapter's: {before == after}")


if __name__ == "__main__":
    main()
