"""Policy-file reviews: what a policy change says, and what it would decide on the results already stored.

``qgate policy diff OLD NEW`` reads two policies (files, or ``REV:path`` from git), lists the
changed settings in words, re-decides every stored decision of the family under NEW from the
stored per-sample scores (no model is loaded, nothing is evaluated) and lists the decisions that
would flip, and the evaluations NEW needs that the store does not hold. ``qgate policy redecide``
records a new decision set for one stored run under another policy; earlier sets stay.

  sources    reading a policy from a file, a family name or git (REV:path)
  changes    the settings that differ, in words; the policy as a table
  evidence   the stored evaluations a decision needs, found by the gate's own cache keys
  redecide   re-deciding stored decisions through the decision engine (qgate.decide)
  findings   what a review found: flips, outcome changes, missing evidence
  output     the review as console text and markdown
"""
