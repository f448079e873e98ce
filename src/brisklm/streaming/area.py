"""The streaming area: GPE and wait-k, ProactiveLLM and StreamingThinker."""

from brisklm.areas import Area

AREA = Area(
    name="streaming",
    summary="Group Position Encoding, wait-k, ProactiveLLM, StreamingThinker",
    kind="method",
    commands=("brisklm.streaming.cli", "brisklm.streaming.thinker.cli"),
    benchmarks={
        "streaming": "brisklm.streaming.bench:streaming_benchmark",
        "proactive": "brisklm.streaming.proactive.bench:proactive_benchmark",
        "thinker": "brisklm.streaming.thinker.bench:thinker_benchmark",
    },
    demos=("brisklm.streaming.demo", "brisklm.streaming.proactive.demo", "brisklm.streaming.thinker.demo"),
    recipes=("brisklm.streaming.zoo", "brisklm.streaming.proactive_zoo", "brisklm.streaming.thinker_zoo"),
)
