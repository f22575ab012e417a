"""Evaluation of (pruned) models: perplexity and zero-shot multiple choice.

perplexity
    WikiText-2 style: the raw text joined and tokenised once, cut into
    non-overlapping windows of `window` tokens (the remainder is dropped);
    ppl = exp(total NLL / number of predicted tokens), every token but the first of
    each window predicted (the SparseGPT / Wanda protocol).

mc_accuracy
    Each record gives a prompt, candidate continuations and the gold one; the
    prediction is the candidate with the largest sum log p(candidate | prompt)
    ("accuracy"), and, as lm-evaluation-harness's acc_norm, the largest sum divided
    by the candidate's length in characters ("accuracy_norm").
    Candidates (task files of ../shared/data/layerif-tasks):
    * GLUE-style records (`instruction`, `output`, `answer`, no `choices`): the label
      words are read from the instruction's first line ("Tell me if the statements
      entailment, not entailment.") or, failing that, are the distinct answers of the
      file; prompt = instruction (+ input), candidate = " " + the output with the
      gold label replaced by each label ("Answer: not entailment.").
    * QA records (`choices` as {label, text} or a list of texts; `answerKey` or
      `answer` a label): style "text" (default, zero-shot): prompt =
      "Question: <question>\\nAnswer:", candidate = " " + choice text; style
      "letter": prompt = instruction, candidate = " " + the output with the gold
      letter replaced ("Answer: The answer is C.") - the fine-tuning format.
"""

from .loglik import check_ids, row_logprob
from .multiple_choice import STYLES, mc_accuracy, mc_item
from .perplexity import perplexity
from .tasks import GLUE_LABELS, accuracy, extract_answer, generate, generate_answer

__all__ = ["check_ids", "row_logprob", "STYLES", "mc_accuracy", "mc_item", "perplexity",
           "GLUE_LABELS", "accuracy", "extract_answer", "generate", "generate_answer"]
