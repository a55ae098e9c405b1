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
# Chain of Draft (Xu et al. 2025, "Chain of Draft: Thinking Faster by Writing Less"): the paper's
# instruction, with the answer format this pipeline grades (\boxed{} instead of a "####" separator).
CHAIN_OF_DRAFT = (
    "{question}\nThink step by step, but only keep a minimum draft for each thinking step, with 5 words at most. "
    "Put the final answer within \\boxed{{}}."
)
# The ``rewrite`` pair source: the model's own correct trace made dense by a rewriter (the model itself
# or a teacher endpoint). Same computations, merged, equations instead of prose: the model's own
# style minus its redundancy, which a small model imitates far better than a larger model's style.
REWRITE = (
    "Rewrite this solution as a minimal, dense derivation. Keep every computation and every number, "
    "merge steps, write equations instead of sentences, drop all explanations. End with the final answer "
    "within \\boxed{{}}.\n\nProblem: {question}\n\nSolution:\n{trace}"
)
