"""Generated prompt sets: enough distinct prompts, and training / evaluation disjoint by topic."""

import re

import pytest

from infalign_jax.rl.tasks import prompt_sets, real


def _topic(task, text):
    """(group, filler text) recovered from a prompt's text by matching the phrasings as patterns,
    independently of the ids and indices `generate` assigns."""
    found = []
    for g, (phrasings, _) in enumerate(prompt_sets.TEMPLATES[task]):
        for phrasing in phrasings:
            head, tail = phrasing.split("{}")
            m = re.fullmatch(re.escape(head) + "(.+)" + re.escape(tail), text)
            if m:
                found.append((g, m.group(1)))
    assert len(set(found)) == 1, (text, found)
    return found[0]


@pytest.mark.parametrize("task", sorted(prompt_sets.TEMPLATES))
def test_enough_distinct_prompts_for_the_reproduction(task):
    prompts = prompt_sets.generate(task)
    texts = [p.text for p in prompts]
    assert len(set(texts)) == len(texts) >= 256 + 128 + 128
    assert len({p.id for p in prompts}) == len(prompts)
    assert all("{" not in t and "}" not in t and t.strip() == t for t in texts)


_FUNCTION_WORDS = {"a", "an", "the", "my", "our", "who", "of", "at", "in", "on", "to", "for",
                   "and", "with", "me", "i", "his", "her", "their", "is", "are"}


@pytest.mark.parametrize("task", sorted(prompt_sets.TEMPLATES))
def test_no_two_topics_are_the_same_topic_in_other_words(task):
    """The split holds out fillers group by group, so one topic written as two fillers crossed
    it: "sister who passed her driving test" (group 1) was trained on while "my driving test"
    (group 5) was held out, 3-6 of 240 helpfulness evaluation prompts a seed. No two fillers
    of several content words may share three quarters of the shorter one's."""
    def words(text):
        return {w for w in re.findall(r"[a-z']+", text.lower()) if w not in _FUNCTION_WORDS}
    fillers = [(g, f) for g, (_, group) in enumerate(prompt_sets.TEMPLATES[task]) for f in group]
    close = [(a, b) for i, a in enumerate(fillers) for b in fillers[i + 1:]
             if min(len(words(a[1])), len(words(b[1]))) >= 2
             and len(words(a[1]) & words(b[1])) >= 0.75 * min(len(words(a[1])),
                                                                len(words(b[1])))]
    assert not close


@pytest.mark.parametrize("task", sorted(prompt_sets.TEMPLATES))
def test_split_is_disjoint_by_topic_and_seeded(task):
    train, evals = prompt_sets.split(task, 256, 128, seed=3)
    assert len(train) == 256 and len(evals) == 128
    train_topics = {_topic(task, p.text) for p in train}
    eval_topics = {_topic(task, p.text) for p in evals}
    assert not train_topics & eval_topics
    # every group contributes to both sides
    assert {g for g, _ in train_topics} == {g for g, _ in eval_topics} == set(
        range(len(prompt_sets.TEMPLATES[task])))
    again = prompt_sets.split(task, 256, 128, seed=3)
    assert [p.id for p in again[0]] == [p.id for p in train]
    other = prompt_sets.split(task, 256, 128, seed=4)
    assert {p.id for p in other[1]} != {p.id for p in evals}


def test_split_passes_over_excluded_prompts():
    train, evals = prompt_sets.split("helpfulness", 20, 10, seed=1)
    assert prompt_sets.split("helpfulness", 20, 10, seed=1,
                             exclude=["not a prompt of the set"]) == (train, evals)
    hit = [evals[0].text, train[0].text]
    train2, evals2 = prompt_sets.split("helpfulness", 20, 10, seed=1, exclude=hit)
    assert len(train2) == 20 and len(evals2) == 10
    assert not set(hit) & {p.text for p in train2 + evals2}
    assert [p.id for p in evals2[:9]] == [p.id for p in evals[1:]]   # the same order, one on
    # in another spelling too (`readers.prompt_key`), as `sources.split_prompts` passes them over
    respelt = [f"  {evals[0].text.upper()} ", train[0].text.lower()]
    assert prompt_sets.split("helpfulness", 20, 10, seed=1, exclude=respelt) == (train2, evals2)
    everything = [p.text for p in prompt_sets.generate("helpfulness")]
    with pytest.raises(ValueError, match=r"has 0 training and 0 held-out-topic evaluation "
                                         r"prompts \(leaving out the prompts the policy trained"):
        prompt_sets.split("helpfulness", 1, 1, seed=1, exclude=everything)


def test_too_many_prompts_refused_with_the_pool_sizes():
    with pytest.raises(ValueError, match=r"num_prompts=10000"):
        prompt_sets.split("helpfulness", 10000, 8, seed=0)
    with pytest.raises(ValueError, match="no templates for task 'nope'"):
        prompt_sets.generate("nope")


def test_task_config_reads_the_generated_set():
    s = real.parse_section({"name": "harmlessness", "num_prompts": 8, "eval_prompts": 12,
                            "data": {"prompts": "generated", "split_seed": 2}})
    split = real._task_prompts(s)
    assert len(split.train_texts) == 8 and len(split.eval_texts) == 12
    train, evals = prompt_sets.split("harmlessness", 8, 12, seed=2)
    assert split.train_texts == [p.text for p in train]
    assert split.eval_ids == [p.id for p in evals]
    # shipped prompts: evaluation is a prefix of training, so it cannot be the larger
    with pytest.raises(ValueError, match="eval_prompts=12 exceeds"):
        real.parse_section({"name": "harmlessness", "num_prompts": 8, "eval_prompts": 12})


def test_prompt_options_the_source_does_not_read_are_refused():
    """split_seed and format overridden with the shipped prompts (taken in order), format with
    the generated sets: accepted and ignored (a sweep over split_seed gave identical points).
    Refused as overrides; a config (or a finished run's record) holding them is still read."""
    import os
    from infalign_jax.infra.config_utils import load_config_module, refuse_unused_overrides
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config_module(os.path.join(root, "configs", "ctrl_real.py")).get_config(
        "task=helpfulness,size=tiny")
    config.unlock()
    for prompts, key in (("", "split_seed"), ("", "format"), ("generated", "format")):
        config.task.data.prompts = prompts
        with pytest.raises(ValueError, match=rf"--config.task.data.{key} is not used by this "
                                             rf"run: it is read only with task.data.prompts"):
            refuse_unused_overrides(config, [f"task.data.{key}"], "--config.")
    config.task.data.prompts = "generated"
    refuse_unused_overrides(config, ["task.data.split_seed"], "--config.")
    s = real.parse_section({"name": "helpfulness", "num_prompts": 8, "eval_prompts": 4,
                            "data": {"split_seed": 7}})
    assert len(real._task_prompts(s).train_texts) == 8   # a recorded run's config is read
