"""The fault-injection suite behind ``scripts/chaos.py``: plan a cycle (:mod:`.plan`),
run its jobs and faults (:mod:`.jobs`), judge the outcome (:mod:`.checks`) and count
the verdicts (:mod:`.report`)."""
