"""LLM-as-judge metrics: ``judge:correctness``, ``judge:faithfulness``, ``judge:relevance``.

``names`` (the judge names; a leaf the manifest imports), ``prompts`` (the Jinja2 templates in
``templates/``, frozen with each run), ``verdict`` (strict parsing of the judge's reply), ``client`` (the
run's judge gateway, ``RUN_DIR/judge/``), ``metric`` (``JudgeMetric``: one judgment per example) and
``agreement`` (``pipemend eval --judge-agreement``: a judge against the exact metric on labelled examples).
"""
