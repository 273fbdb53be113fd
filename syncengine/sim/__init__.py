"""The deterministic simulator: scenarios, virtual time, a simulated network, faults, an
invariant checker shared with the real-process tier, and readable reports (MISSION R16).

One seed drives every choice. ``syncengine scenario run FILE --seed N`` replays a run
exactly; see ``docs/scenarios.md``.
"""
