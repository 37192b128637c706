"""`relayquant eval --tasks`: lm-eval tasks through its Python API, on local task data only."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from jobs.cli import main

pytestmark = pytest.mark.unit

QUESTIONS = [
    {"question": "The sky is", "choices": [" blue", " loud", " seven"], "answer": 0},
    {"question": "Two plus two is", "choices": [" fish", " four", " under"], "answer": 1},
    {"question": "Ice is", "choices": [" cold", " angry", " tall"], "answer": 0},
    {"question": "A cat says", "choices": [" moo", " bark", " meow"], "answer": 2},
    {"question": "Fire is", "choices": [" wet", " hot", " square"], "answer": 1},
    {"question": "Grass is", "choices": [" green", " metal", " sour"], "answer": 0},
]


def local_task(folder) -> str:
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "tiny_choice.yaml").write_text(
        "task: relayquant_tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "target_delimiter: ''\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    return str(folder)


@torch.no_grad()
def expected_accuracy(model_path: str) -> float:
    """Each question's choice with the highest summed log-likelihood, by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    right = 0
    for q in QUESTIONS:
        context = tok(q["question"], add_special_tokens=False).input_ids
        scores = []
        for choice in q["choices"]:
            full = tok(q["question"] + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([full])
            logp = model(ids).logits[0, :-1].log_softmax(-1)
            cont = range(len(context), len(full))
            scores.append(sum(logp[i - 1, full[i]].item() for i in cont))
        right += int(max(range(len(scores)), key=scores.__getitem__) == q["answer"])
    return right / len(QUESTIONS)


def test_without_lm_eval_the_refusal_names_the_extra(tiny_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert main(["eval", "--model", tiny_model("llama"), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert "--tasks" in err and "pip install" in err


def test_a_local_task_scores_the_model(tiny_model, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    model = tiny_model("llama")
    tasks = local_task(tmp_path)
    assert main(["eval", "--model", model, "--tasks", "relayquant_tiny_choice",
                 "--include-path", tasks, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    acc = result["tasks"]["relayquant_tiny_choice"]["acc,none"]
    assert acc == pytest.approx(expected_accuracy(model))
    # an unknown task is refused before the model is loaded
    assert main(["eval", "--model", model, "--tasks", "no_such_task",
                 "--include-path", tasks]) == 2
    assert "no_such_task" in capsys.readouterr().err
