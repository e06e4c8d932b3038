"""The built-in task: sort a few digits, with a hidden ground-truth scorer.

A prompt is ``"sort:3915="`` and the right response is ``"1359"``. The scorer is exact match (1.0 or
0.0), so the task score of a policy is the fraction of prompts it answers right.

The data is deliberately imperfect, so that supervised fine-tuning lands clearly below the ceiling and
there is something for PPO to gain:

- SFT demonstrations are wrong with probability ``demo_error_rate`` (two neighbouring digits swapped):
  a model that imitates them perfectly still scores about ``1 - demo_error_rate``.
- Preference pairs put the right answer against a flawed one (a neighbour swap, a shuffle, a sorted
  answer with a digit copied over its neighbour, a digit dropped, repeated or changed), and the label
  is flipped with probability ``label_noise`` (noisy raters). The sorted-but-wrong-digits kind is what
  a policy finds first when it hacks a reward model that only learned "is it sorted". The held-out
  pairs are clean, so the reward model's held-out accuracy measures agreement with the hidden scorer.

Everything is generated from a seed; ``write_task_data`` writes the JSONL files that the SFT, reward
model and PPO stages read (the same formats as a user's own data).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .data import write_jsonl

PREFIX = "sort:"
SEP = "="


@dataclass
class SortTask:
    min_digits: int = 3
    max_digits: int = 5

    def __post_init__(self):
        if not 2 <= self.min_digits <= self.max_digits:
            raise ValueError(f"task digits: need 2 <= min_digits <= max_digits, got "
                             f"min_digits={self.min_digits}, max_digits={self.max_digits}")

    def prompt(self, rng: random.Random) -> str:
        n = rng.randint(self.min_digits, self.max_digits)
        return PREFIX + "".join(str(rng.randrange(10)) for _ in range(n)) + SEP

    @staticmethod
    def solve(prompt: str) -> str | None:
        """The right response to `prompt`, or None if it is not a sort prompt."""
        if not (prompt.startswith(PREFIX) and prompt.endswith(SEP)):
            return None
        digits = prompt[len(PREFIX):-len(SEP)]
        if not digits.isdigit():
            return None
        return "".join(sorted(digits))

    @classmethod
    def score(cls, prompt: str, response: str) -> float:
        """Hidden ground truth: 1.0 if `response` is the sorted digits of `prompt`, else 0.0."""
        return float(response == cls.solve(prompt))

    @staticmethod
    def swap_neighbours(answer: str, rng: random.Random) -> str:
        """`answer` with two neighbouring unequal digits swapped (one digit changed if all are equal)."""
        spots = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
        if not spots:
            return SortTask.change_digit(answer, rng)
        i = rng.choice(spots)
        return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]

    @staticmethod
    def change_digit(answer: str, rng: random.Random) -> str:
        i = rng.randrange(len(answer))
        return answer[:i] + str((int(answer[i]) + rng.randint(1, 9)) % 10) + answer[i + 1:]

    def flawed(self, answer: str, rng: random.Random) -> str:
        """A wrong response of one of the kinds a weak (or reward-hacking) policy makes."""
        kind = rng.random()
        if kind < 0.35:  # almost sorted
            return self.swap_neighbours(answer, rng)
        if kind < 0.5:  # not sorted at all
            chars = list(answer)
            for _ in range(10):
                rng.shuffle(chars)
                if "".join(chars) != answer:
                    return "".join(chars)
            return self.swap_neighbours(answer, rng)
        if kind < 0.8:  # sorted, but a digit copied over its neighbour: only the digit counts can tell
            spots = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
            if spots:
                i = rng.choice(spots)
                return answer[:i] + answer[i + 1] * 2 + answer[i + 2:] if rng.random() < 0.5 else \
                    answer[:i] + answer[i] * 2 + answer[i + 2:]
            return self.change_digit(answer, rng)
        if kind < 0.9:  # a digit dropped or repeated
            i = rng.randrange(len(answer))
            return answer[:i] + answer[i + 1:] if rng.random() < 0.5 and len(answer) > 1 else \
                answer[:i] + answer[i] + answer[i:]
        return self.change_digit(answer, rng)

    def sft_records(self, n: int, demo_error_rate: float, rng: random.Random) -> list[dict]:
        records = []
        for _ in range(n):
            p = self.prompt(rng)
            answer = self.solve(p)
            if rng.random() < demo_error_rate:
                answer = self.swap_neighbours(answer, rng)
            records.append({"prompt": p, "response": answer})
        return records

    def preference_records(self, n: int, label_noise: float, rng: random.Random) -> list[dict]:
        records = []
        for _ in range(n):
            p = self.prompt(rng)
            good = self.solve(p)
            bad = self.flawed(good, rng)
            if rng.random() < label_noise:
                good, bad = bad, good
            records.append({"prompt": p, "chosen": good, "rejected": bad})
        return records

    def prompt_records(self, n: int, rng: random.Random) -> list[dict]:
        """{prompt, answer}: the reference answer is for verifiable rewards (``answer_reward``); PPO ignores it."""
        return [{"prompt": p, "answer": self.solve(p)} for p in (self.prompt(rng) for _ in range(n))]


def task_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The hidden scorer as a custom reward callable (``--ppo.reward_fn=rlhf_fast.rlhf.task:task_reward``)."""
    return [SortTask.score(p, r) for p, r in zip(prompts, responses)]


def answer_reward(prompts: list[str], responses: list[str], *, answer: list[str]) -> list[float]:
    """A verifiable reward: 1.0 where the response is the prompt's reference `answer` field, else 0.0
    (``--rl.reward_fn=rlhf_fast.rlhf.task:answer_reward`` on prompts JSONL with an "answer" field)."""
    return [float(r == a) for r, a in zip(responses, answer)]


def write_task_data(out_dir: str | Path, *, seed: int, min_digits: int, max_digits: int, n_sft: int,
                    n_pairs: int, n_eval_pairs: int, n_prompts: int, n_eval_prompts: int,
                    demo_error_rate: float, label_noise: float) -> dict[str, Path]:
    """Write sft.jsonl, rm_train.jsonl, rm_eval.jsonl, prompts.jsonl and eval_prompts.jsonl; return their paths."""
    task = SortTask(min_digits, max_digits)
    rng = random.Random(seed)
    out = Path(out_dir)
    files = {
        "sft": (out / "sft.jsonl", task.sft_records(n_sft, demo_error_rate, rng)),
        "rm_train": (out / "rm_train.jsonl", task.preference_records(n_pairs, label_noise, rng)),
        "rm_eval": (out / "rm_eval.jsonl", task.preference_records(n_eval_pairs, 0.0, rng)),
        "prompts": (out / "prompts.jsonl", task.prompt_records(n_prompts, rng)),
        "eval_prompts": (out / "eval_prompts.jsonl", task.prompt_records(n_eval_prompts, rng)),
    }
    for path, records in files.values():
        write_jsonl(path, records)
    return {k: path for k, (path, _) in files.items()}
