"""The lm-eval bridge, offline: a local multiple-choice task, a tiny random Llama, a word-level tokenizer.

lm-eval 0.4.13 indexes its ~14k built-in task YAMLs once per TaskManager (15-30 s); the
bridge caches the manager per include_path, so every test here shares one index build.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from rcpu.errors import RcpuError  # noqa: E402
from rcpu.evaluate.zeroshot import (  # noqa: E402
    PAPER_METRICS,
    PAPER_TASKS,
    ZeroShotResult,
    select_metric,
    zero_shot,
)

TASK = "rcpu_toy_mc"
MISSING = "rcpu_toy_missing_data"

# Synthetic questions, 2-4 choices of 1-3 words each (so acc and acc_norm can differ).
DOCS = [
    {"question": "What colour is a ripe banana", "choices": ["yellow", "deep blue", "purple"], "label": 0},
    {"question": "How many legs does a spider have", "choices": ["eight", "six", "two", "none at all"], "label": 0},
    {"question": "Which animal says moo", "choices": ["a cow", "a cat"], "label": 0},
    {"question": "Where does the sun rise", "choices": ["in the west", "in the east"], "label": 1},
    {"question": "What do bees make", "choices": ["milk", "honey", "bread and butter"], "label": 1},
    {"question": "Which season is coldest", "choices": ["summer", "winter", "spring", "autumn"], "label": 1},
    {"question": "What is frozen water called", "choices": ["steam", "sand", "ice"], "label": 2},
    {"question": "Which tool cuts paper", "choices": ["a spoon", "scissors"], "label": 1},
    {"question": "What colour is fresh grass", "choices": ["green", "bright orange", "grey"], "label": 0},
    {"question": "How many days are in a week", "choices": ["five", "seven", "ten", "twelve"], "label": 1},
    {"question": "Which bird cannot fly", "choices": ["a penguin", "an eagle", "a sparrow"], "label": 0},
    {"question": "What do we breathe in", "choices": ["air", "stones"], "label": 0},
    {"question": "Which planet do we live on", "choices": ["mars", "the earth", "venus"], "label": 1},
    {"question": "What falls from rain clouds", "choices": ["water drops", "feathers", "coins", "sand"], "label": 0},
    {"question": "What does a key open", "choices": ["a lock", "a song"], "label": 0},
    {"question": "Which meal comes in the morning", "choices": ["dinner", "supper", "breakfast"], "label": 2},
]

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _context(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"  # what doc_to_text renders


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    tasks = root / "tasks"
    tasks.mkdir()
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    cache = root / "hf_datasets_cache"
    (tasks / "toy.yaml").write_text(YAML.format(name=TASK, data=data, cache=cache))
    (tasks / "missing.yaml").write_text(YAML.format(name=MISSING, data=root / "absent.jsonl", cache=cache))
    return str(tasks)


@pytest.fixture(scope="module")
def tokenizer():
    split = pre_tokenizers.Whitespace()
    words = set()
    for doc in DOCS:
        for text in (_context(doc), *doc["choices"]):
            words.update(w for w, _ in split.pre_tokenize_str(text))
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = split
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,  # sharp, context-dependent predictions rather than near-uniform ones
    )
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def _reference(model, tokenizer, docs) -> dict[str, float]:
    """acc / acc_norm computed directly: summed log-probs of each ' choice' given the prompt."""
    acc = acc_norm = 0
    for doc in docs:
        ctx = tokenizer(_context(doc), add_special_tokens=False)["input_ids"]
        lls = []
        for choice in doc["choices"]:
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            # the token at position j is predicted by row j - 1
            rows = torch.arange(len(ctx) - 1, ids.shape[1] - 1)
            lls.append(float(logp[rows, ids[0, rows + 1]].sum()))
        lls = torch.tensor(lls, dtype=torch.float64)
        lengths = torch.tensor([float(len(c)) for c in doc["choices"]], dtype=torch.float64)
        acc += int(int(lls.argmax()) == doc["label"])
        acc_norm += int(int((lls / lengths).argmax()) == doc["label"])
    return {"acc": acc / len(docs), "acc_norm": acc_norm / len(docs)}


def test_tokenizer_splits_cleanly(tokenizer):
    # precondition for the reference: encoding prompt + " choice" == encoding each part
    for doc in DOCS:
        ctx = _context(doc)
        for choice in doc["choices"]:
            whole = tokenizer(ctx + " " + choice)["input_ids"]
            parts = tokenizer(ctx, add_special_tokens=False)["input_ids"]
            parts += tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            assert whole == parts
            assert tokenizer.unk_token_id not in whole


def test_zero_shot_local_task_matches_direct_scoring(model, tokenizer, task_dir):
    model.train()  # the bridge must evaluate in eval mode and restore the flag
    result = zero_shot(model, tokenizer, TASK, batch_size=4, include_path=task_dir)
    assert model.training
    model.eval()

    assert isinstance(result, ZeroShotResult)
    assert list(result.tasks) == [TASK]
    row = result.tasks[TASK]
    assert row["metric"] == "acc_norm"  # unknown task reporting both -> acc_norm
    assert 0.0 <= row["value"] <= 1.0
    assert row["n"] == len(DOCS)
    assert row["stderr"] is not None and row["stderr"] >= 0
    assert result.mean == pytest.approx(row["value"])
    assert result.harness_version
    assert result.num_fewshot == 0 and result.limit is None

    # independent check: the harness saw the same prompts/continuations the model scores here
    ref = _reference(model, tokenizer, DOCS)
    assert row["metrics"]["acc"] == pytest.approx(ref["acc"])
    assert row["metrics"]["acc_norm"] == pytest.approx(ref["acc_norm"])
    assert row["value"] == pytest.approx(ref["acc_norm"])

    json.dumps(result.to_dict())
    table = result.format()
    assert TASK in table and "mean" in table and "acc_norm" in table


def test_zero_shot_limit_and_metric_override(model, tokenizer, task_dir):
    rng = torch.get_rng_state()  # lm-eval reseeds the global generators; the bridge restores them
    result = zero_shot(model, tokenizer, [TASK], batch_size=3, include_path=task_dir, limit=5,
                       metrics={TASK: "acc"})
    row = result.tasks[TASK]
    assert row["n"] == 5 and result.limit == 5
    assert row["metric"] == "acc"
    assert row["value"] == pytest.approx(_reference(model, tokenizer, DOCS[:5])["acc"])
    assert torch.equal(torch.get_rng_state(), rng)

    with pytest.raises(RcpuError, match="no metric 'f1'"):
        zero_shot(model, tokenizer, TASK, include_path=task_dir, limit=2, metrics={TASK: "f1"})


def test_unknown_task_name(model, tokenizer, task_dir):
    with pytest.raises(RcpuError, match="unknown lm-eval task 'no_such_task_xyz'"):
        zero_shot(model, tokenizer, [TASK, "no_such_task_xyz"], include_path=task_dir)
    with pytest.raises(RcpuError, match=f"did you mean {TASK}"):
        zero_shot(model, tokenizer, "rcpu_toy_m", include_path=task_dir)


def test_dataset_that_cannot_load(model, tokenizer, task_dir):
    with pytest.raises(RcpuError, match=f"could not load the dataset for task '{MISSING}'") as info:
        zero_shot(model, tokenizer, MISSING, include_path=task_dir)
    assert "\n" not in str(info.value) and "data files" in str(info.value)


def test_paper_task_with_hub_unreachable(model, tokenizer, task_dir, monkeypatch):
    # what `datasets` raises offline (after its retries), without waiting for the retries
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RcpuError, match="could not load the dataset for task 'boolq'.*hub reachable") as info:
        zero_shot(model, tokenizer, "boolq", include_path=task_dir)
    assert "\n" not in str(info.value)


def test_argument_errors(model, tokenizer):
    for kwargs in ({"batch_size": 0}, {"batch_size": "big"}, {"limit": 0}, {"num_fewshot": -1}):
        with pytest.raises(RcpuError):
            zero_shot(model, tokenizer, TASK, **kwargs)
    with pytest.raises(RcpuError, match="no tasks"):
        zero_shot(model, tokenizer, " , ")
    with pytest.raises(RcpuError, match="include_path"):
        zero_shot(model, tokenizer, TASK, include_path="/nonexistent/rcpu/tasks")
    with pytest.raises(RcpuError, match="not a folder"):
        zero_shot(model, tokenizer, TASK, include_path=__file__)


def test_missing_lm_eval(model, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(RcpuError, match=r"pip install 'rcpu\[eval\]'"):
        zero_shot(model, tokenizer, "boolq")


def test_paper_metric_choice():
    assert set(PAPER_METRICS) == set(PAPER_TASKS)
    both = ("acc", "acc_norm")
    expected = {
        "boolq": "acc",
        "piqa": "acc",
        "winogrande": "acc",
        "hellaswag": "acc_norm",
        "arc_easy": "acc_norm",
        "arc_challenge": "acc_norm",
        "openbookqa": "acc_norm",
    }
    for task, metric in expected.items():
        assert select_metric(task, both) == metric
    # tasks outside the paper set: acc_norm if reported, else acc
    assert select_metric("lambada_openai", ["perplexity", "acc"]) == "acc"
    assert select_metric("sciq", both) == "acc_norm"
    # the paper metric falls back when a same-named task lacks it
    assert select_metric("piqa", ["acc_norm"]) == "acc_norm"
    # overrides win (Wanda reports plain acc everywhere)
    assert select_metric("hellaswag", both, {"hellaswag": "acc"}) == "acc"
    with pytest.raises(RcpuError, match="no metric 'f1'"):
        select_metric("boolq", both, {"boolq": "f1"})
    with pytest.raises(RcpuError, match="neither acc_norm nor acc"):
        select_metric("gsm8k", ["exact_match"])
    assert select_metric("gsm8k", ["exact_match"], {"gsm8k": "exact_match"}) == "exact_match"


def test_cli_eval_tasks_on_saved_model(model, tokenizer, task_dir, tmp_path, capsys):
    from rcpu.cli import main

    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "zs.json"
    assert main(["eval", "--model", str(tmp_path / "m"), "--ppl", "none", "--tasks", TASK, "--include_path", task_dir,
                 "--device", "cpu", "--output", str(out), "-q"]) == 0
    assert TASK in capsys.readouterr().out
    result = json.loads(out.read_text())["zero_shot"]
    assert result["tasks"][TASK]["value"] == pytest.approx(_reference(model, tokenizer, DOCS)["acc_norm"])
