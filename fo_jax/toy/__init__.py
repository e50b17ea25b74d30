"""The toy world: a closed world of spoken Q&A to train and test a small Freeze-Omni end to end.

``world`` defines the content and the train/test split, ``synth`` the voices, clip cache and the
independent recognizer, ``build`` writes the speech clips and every stage's manifest. ``steps`` is
the resumable step runner, ``pipeline`` the steps of ``fo-jax toy`` (``llm``: the text LLM,
``codec``: codec training and round-trip intelligibility), ``report`` the markdown/JSON/PNG report.
"""
