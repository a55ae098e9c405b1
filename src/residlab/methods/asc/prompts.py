"""The prompt templates of the ASC pipeline (``{question}`` is replaced by the problem text).

Both traces of a pair are read under the same ``VERBOSE`` prompt, so that the pair differs only in
the reasoning itself; both end with ``\\boxed{answer}``, so that the end of the trace (which a
last-token reading sees) is not where they differ.
"""

VERBOSE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
CONCISE = (
    "{question}\nSolve this with equations only: no words, no explanations, as few steps as possible. "
    "Put the final answer within \\boxed{{}}."
)
