"""`--selftest`: up, one generation through a replica in each host namespace (the others in
standby, so that one alone consumes), the shaped link measured between two hosts, down, and
nothing left behind. One summary line; `ok` only if all of that held."""
from __future__ import annotations

import time

import requests

from bench.testbed.fleet import Testbed
from bench.testbed.link import measure

RATE_TOLERANCE = (0.85, 1.05)  # measured / configured: tbf lets bursts through, TCP ramps up


def generate_on_each_host(testbed: Testbed) -> dict[str, str]:
    """Host → the text its replica generated, every other replica in standby meanwhile."""
    by_host = {host: replicas[0]["slot"] for host, replicas in testbed.replicas_by_host().items()}
    texts = {}
    for host, slot in sorted(by_host.items()):
        others = [s for s in by_host.values() if s != slot]
        if others:
            testbed.modify("TriggerNormalDown", stub_indices=others)
            testbed.wait_states({s: "standby" for s in others} | {slot: "active"})
        response = requests.post(f"{testbed.base_url}/generate",
                                 json={"inputs": "w5 w6 w7", "parameters": {"max_new_tokens": 4}}, timeout=60)
        response.raise_for_status()  # a 5xx reported as such, not as a missing key
        texts[host] = response.json()["generated_text"]
        if others:
            testbed.modify("TriggerNormalUp", old_stub_indices=[], new_stub_indices=others)
            testbed.wait_states({s: "active" for s in others})
    return texts


def selftest(testbed: Testbed) -> tuple[bool, str]:
    started = time.perf_counter()
    problems, parts = [], []
    try:
        testbed.up()
        parts.append(f"{len(testbed.hosts)} hosts up in {time.perf_counter() - started:.1f} s")
        texts = generate_on_each_host(testbed)
        missing = sorted({h.name for h in testbed.hosts} - set(texts))
        if missing:
            problems.append(f"no replica generated on {', '.join(missing)}")
        parts.append(f"generated on {', '.join(f'{h} ({len(t.split())} words)' for h, t in sorted(texts.items()))}")
        if len(testbed.hosts) >= 2:
            link = measure(testbed, testbed.hosts[0], testbed.hosts[1])
            low, high = RATE_TOLERANCE
            parts.append(f"link {link['from']}→{link['to']} {link['mbit_s']:.0f} Mbit/s of "
                         f"{link['configured_mbit_s']:.0f} ({link['ratio']:.2f})")
            if not low <= link["ratio"] <= high:
                problems.append(f"link rate {link['ratio']:.2f}× the configured, outside {low}..{high}")
    except Exception as error:  # reported in the summary line; the teardown still runs
        problems.append(f"{type(error).__name__}: {error}")
    finally:
        testbed.down()
    left = testbed.left_behind()
    if left:
        problems.append(f"left behind: {', '.join(left)}")
    else:
        parts.append("torn down, nothing left")
    verdict = "ok" if not problems else "FAILED: " + "; ".join(problems)
    return not problems, f"testbed selftest {verdict}: " + "; ".join(parts)
