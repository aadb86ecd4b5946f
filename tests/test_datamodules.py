"""MathDataModule on real GSM8K / MATH files, bad-input handling, and the arithmetic task."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from lightning_flow.datamodules import (
    ArithmeticDataModule,
    DataError,
    MathDataModule,
    MathExample,
    generate_arithmetic,
)

from lightning_flow.tokenizer import load_tokenizer


def check_left_padded(batch: dict, pad_id: int, tokenizer, add_special_tokens: bool = True) -> None:
    """Masks are 0..0 1..1, pads sit where the mask is 0, and the kept ids re-tokenize the prompt."""
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
    assert ids.shape[0] == len(batch["prompts"]) == len(batch["golds"]) == len(batch["sources"])
    assert (mask[:, -1] == 1).all()
    assert (mask[:, 1:] >= mask[:, :-1]).all()  # never a 0 after a 1
    assert (ids[mask == 0] == pad_id).all()
    for row, prompt in zip(range(ids.shape[0]), batch["prompts"]):
        kept = ids[row][mask[row].bool()].tolist()
        assert kept == tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids


def gsm8k_gold_from_line(line: str) -> str:
    """The final answer straight from the raw JSON text: digits after the last '####'."""
    return re.findall(r"####\s*(-?[\d,\.]+)", line)[-1].replace(",", "")


# ---- real data ----------------------------------------------------------------------------
def test_gsm8k_batches(shared_data: Path, gpt2_tokenizer) -> None:
    test_file = shared_data / "gsm8k" / "test.jsonl"
    data = MathDataModule(
        train=str(shared_data / "gsm8k" / "train.jsonl"),
        val=str(test_file),
        limit=200,
        batch_size=8,
        val_batch_size=50,
    )
    data.set_tokenizer(gpt2_tokenizer)
    data.setup("fit")
    assert data.stats == {
        "train_examples": 200,
        "val_examples": 200,
        "skipped_invalid": 0,
        "unparseable_gold": 0,
        "dropped_too_long": 0,
        "duplicate_prompts": 0,
    }

    train = list(data.train_dataloader())
    assert len(train) == 200 // 8 and all(b["prompt_ids"].shape[0] == 8 for b in train)
    check_left_padded(train[0], gpt2_tokenizer.pad_token_id, gpt2_tokenizer)

    lines = test_file.read_text(encoding="utf-8").splitlines()[:200]
    val = list(data.val_dataloader())
    assert [g for b in val for g in b["golds"]] == [gsm8k_gold_from_line(line) for line in lines]
    assert [s for b in val for s in b["sources"]] == [f"{test_file}:{i}" for i in range(1, 201)]
    first = json.loads(lines[0])["question"]
    assert val[0]["prompts"][0] == f"{first}\nPut the final answer in \\boxed{{}}.\n"
    check_left_padded(val[0], gpt2_tokenizer.pad_token_id, gpt2_tokenizer)


def test_training_order_is_seeded(shared_data: Path, gpt2_tokenizer) -> None:
    def first_sources(seed: int) -> list[str]:
        data = MathDataModule(
            train=str(shared_data / "gsm8k" / "test.jsonl"), val_size=20, limit=100, seed=seed
        )
        data.set_tokenizer(gpt2_tokenizer)
        data.setup()
        return next(iter(data.train_dataloader()))["sources"]

    assert first_sources(0) == first_sources(0) != first_sources(1)


def test_held_out_val_is_disjoint(shared_data: Path) -> None:
    path = str(shared_data / "gsm8k" / "test.jsonl")
    data = MathDataModule(train=path, val_size=100, seed=3)
    train, val = data.load_examples("train"), data.load_examples("val")
    assert (len(train), len(val)) == (1219, 100)
    assert not {e.source for e in train} & {e.source for e in val}
    again = MathDataModule(train=path, val_size=100, seed=3).load_examples("val")
    other = MathDataModule(train=path, val_size=100, seed=4).load_examples("val")
    assert again == val != other


def test_math_golds_match_math500_answers(shared_data: Path, gpt2_tokenizer) -> None:
    # MATH rows have no 'answer': the gold comes from the last \boxed{} of the solution. MATH-500
    # ships reference answers for 500 of the same problems: they must agree.
    reference = {}
    for line in (shared_data / "math500" / "test.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        reference[row["problem"]] = row["answer"]
    data = MathDataModule(
        train=str(shared_data / "math" / "test.jsonl"), val=str(shared_data / "math500" / "test.jsonl")
    )
    shared = [e for e in data.load_examples("train") if e.question in reference]
    assert len(shared) == 500
    assert [e.gold for e in shared] == [reference[e.question] for e in shared]
    assert [e.gold for e in data.load_examples("val")] == list(reference.values())


def test_math500_with_chat_template(shared_data: Path) -> None:
    tokenizer = load_tokenizer(str(shared_data / "tokenizer"))  # a fresh object: the template is set on it
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    path = str(shared_data / "math500" / "test.jsonl")
    data = MathDataModule(train=path, val=path, limit=40, batch_size=4, instruction="Box it.")
    data.set_tokenizer(tokenizer)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    first = json.loads(Path(path).read_text(encoding="utf-8").splitlines()[0])
    assert batch["prompts"][0] == f"<|user|>{first['problem']}\nBox it.\n<|assistant|>"
    assert batch["golds"][0] == first["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    check_left_padded(batch, tokenizer.pad_token_id, tokenizer, add_special_tokens=False)


def test_stories260k_tokenizer_keeps_bos(shared_data: Path) -> None:
    path = str(shared_data / "gsm8k" / "test.jsonl")
    data = MathDataModule(
        train=path,
        val=path,
        limit=16,
        tokenizer=str(shared_data / "models" / "stories260K" / "hf"),
        max_prompt_length=10_000,
    )
    data.setup()
    tokenizer = data.get_tokenizer()
    batch = next(iter(data.val_dataloader()))
    check_left_padded(batch, tokenizer.pad_token_id, tokenizer)
    first_real = batch["prompt_mask"].argmax(dim=1)
    assert (batch["prompt_ids"].gather(1, first_real[:, None]) == tokenizer.bos_token_id).all()
    assert tokenizer.bos_token_id == 1


# ---- bad input ----------------------------------------------------------------------------
GOOD_GSM = json.dumps({"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"})
GOOD_MATH = json.dumps({"problem": "Halve 1.", "solution": "It is $\\boxed{\\frac{1}{2}}$."})


def write(tmp_path: Path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def module_for(train: str, val: str, gpt2_tokenizer, **kwargs) -> MathDataModule:
    data = MathDataModule(train=train, val=val, batch_size=1, **kwargs)
    data.set_tokenizer(gpt2_tokenizer)
    return data


def test_row_formats(tmp_path: Path, gpt2_tokenizer) -> None:
    rows = [
        GOOD_GSM,
        GOOD_MATH,
        json.dumps({"problem": "p", "solution": "\\boxed{1}", "answer": "2"}),
        json.dumps({"question": "q", "answer": "#### 1,234"}),
    ]
    path = write(tmp_path, "mixed.jsonl", rows)
    examples = MathDataModule(train=path, val=path).load_examples("train")
    assert [e.gold for e in examples] == ["4", "\\frac{1}{2}", "2", "1234"]
    assert examples[0] == MathExample("What is 2+2?", "4", "2+2=4\n\\boxed{4}", f"{path}:1")


def test_malformed_line(tmp_path: Path, gpt2_tokenizer) -> None:
    path = write(tmp_path, "broken.jsonl", [GOOD_GSM, '{"question": "x", "answer": ', GOOD_MATH])
    val = write(tmp_path, "val.jsonl", [GOOD_GSM])
    with pytest.raises(DataError, match=r"broken\.jsonl:2: malformed JSON"):
        module_for(path, val, gpt2_tokenizer).setup()
    data = module_for(path, val, gpt2_tokenizer, skip_invalid=True)
    data.setup()
    assert data.stats["skipped_invalid"] == 1 and data.stats["train_examples"] == 2


def test_missing_fields_lists_existing(tmp_path: Path, gpt2_tokenizer) -> None:
    path = write(
        tmp_path, "fields.jsonl", [GOOD_GSM, GOOD_GSM, json.dumps({"question": "x", "solution": "y"})]
    )
    with pytest.raises(DataError, match=r"fields\.jsonl:3: expected fields .*'question', 'solution'"):
        module_for(path, path, gpt2_tokenizer).setup()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "answer": "the answer is 4"}, "no '#### <final answer>' line"),
        ({"problem": "p", "solution": "it is 4"}, "no 'answer' and its solution has no"),
        ({"question": 5, "answer": "#### 4"}, "'question' must be a string"),
    ],
)
def test_unusable_rows(tmp_path: Path, row: dict, message: str) -> None:
    path = write(tmp_path, "rows.jsonl", [GOOD_GSM, json.dumps(row)])
    with pytest.raises(DataError, match=rf"rows\.jsonl:2: .*{re.escape(message)}"):
        MathDataModule(train=path, val=path).load_examples("train")


def test_unparseable_gold(tmp_path: Path, gpt2_tokenizer) -> None:
    path = write(
        tmp_path, "golds.jsonl", [GOOD_MATH, json.dumps({"problem": "p", "answer": "\\frac{"}), GOOD_GSM]
    )
    with pytest.raises(
        DataError, match=r"golds\.jsonl:2: math_verify cannot parse the gold answer '\\\\frac\{'"
    ):
        module_for(path, path, gpt2_tokenizer).setup()
    data = module_for(path, path, gpt2_tokenizer, skip_invalid=True)
    data.setup()
    assert data.stats["unparseable_gold"] == 2 and data.stats["train_examples"] == 2  # once per split


def test_too_long_prompt_dropped(tmp_path: Path, gpt2_tokenizer) -> None:
    long_row = json.dumps({"question": "word " * 100, "answer": "#### 1"})
    path = write(tmp_path, "long.jsonl", [GOOD_GSM, long_row, GOOD_GSM])
    data = module_for(path, path, gpt2_tokenizer, max_prompt_length=40)
    data.setup()
    assert (
        data.stats["dropped_too_long"] == 2
        and data.stats["train_examples"] == data.stats["val_examples"] == 2
    )
    assert all(s.endswith((":1", ":3")) for b in data.val_dataloader() for s in b["sources"])


def test_missing_file_and_missing_tokenizer(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere" / "train.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        MathDataModule(train=missing).load_examples("train")
    with pytest.raises(FileNotFoundError, match="data/train.jsonl"):
        MathDataModule(train="data/train.jsonl").load_examples("train")
    data = ArithmeticDataModule(num_train=10, num_val=5)
    with pytest.raises(ValueError, match="set data.init_args.tokenizer"):
        data.setup()


# ---- arithmetic -----------------------------------------------------------------------------
def evaluate(question: str) -> int:
    """Left-to-right + / - over non-negative integers, independent of the generator."""
    tokens = re.findall(r"\d+|[+-]", question)
    assert "".join(tokens) == question
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        value = value + int(operand) if op == "+" else value - int(operand)
    return value


def test_generate_arithmetic_is_correct() -> None:
    examples = generate_arithmetic(500, seed=7, min_ops=1, max_ops=3, max_operand=12)
    assert len(examples) == 500
    for i, example in enumerate(examples):
        operands = [int(t) for t in re.findall(r"\d+", example.question)]
        assert 2 <= len(operands) <= 4 and all(0 <= n <= 12 for n in operands)
        assert example.gold == str(evaluate(example.question))
        assert example.source == f"arithmetic:seed=7:i={i}"
        steps = re.findall(r"(-?\d+)([+-])(\d+)=(-?\d+)\.", example.solution)
        assert len(steps) == len(operands) - 1
        assert (
            example.solution
            == " ".join(f"{a}{op}{b}={c}." for a, op, b, c in steps) + f" \\boxed{{{example.gold}}}"
        )
    assert {len(re.findall(r"[+-]", e.question)) for e in examples} == {1, 2, 3}


def test_generate_arithmetic_is_deterministic() -> None:
    assert generate_arithmetic(50, seed=1) == generate_arithmetic(50, seed=1)
    assert generate_arithmetic(50, seed=1) != generate_arithmetic(50, seed=2)
    with pytest.raises(ValueError, match="min_ops"):
        generate_arithmetic(5, seed=0, min_ops=3, max_ops=2)


def test_arithmetic_module(gpt2_tokenizer) -> None:
    data = ArithmeticDataModule(
        num_train=300, num_val=50, batch_size=16, instruction="", plain_template="{question}\n"
    )
    data.set_tokenizer(gpt2_tokenizer)
    data.setup()
    train, val = data.load_examples("train"), data.load_examples("val")
    assert len(val) == 50 and not {e.question for e in train} & {e.question for e in val}
    assert all(e.source.startswith("arithmetic:seed=1000:") for e in val)
    batch = next(iter(data.val_dataloader()))
    assert batch["prompts"][0] == f"{val[0].question}\n" and batch["golds"][0] == val[0].gold
    check_left_padded(batch, gpt2_tokenizer.pad_token_id, gpt2_tokenizer)
    assert len(data.train_dataloader()) == 300 // 16


def test_arithmetic_val_space_exhausted() -> None:
    # Operands 0..1 with one operation give 8 questions; 200 training draws cover them all.
    data = ArithmeticDataModule(num_train=200, num_val=5, min_ops=1, max_ops=1, max_operand=1)
    with pytest.raises(DataError, match="val questions outside train"):
        data.load_examples("val")
