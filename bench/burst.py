"""The classroom burst: N submissions in mixed languages posted within about a second.

    python bench/burst.py [N] [--tiny] [--out DIR]

The server starts with `--max-queue-size 1000`, so the queue holds the whole burst. N programs (a mix like
a class's: Python, JavaScript, C, C++, Java, Bash, Ruby, each printing a sum) are POSTed by 32 client
threads at once. Every POST should answer 201 and every submission end Accepted with the right output (none
lost); refusals and wrong outcomes are counted, not hidden. The figure is the time from the first POST until the last submission finishes, against the
same N programs compiled and run directly in the sandbox (bench/common.py run_direct), as many at once as
CPUs.
"""

from __future__ import annotations

import collections
import os
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

from common import Result, Row, get_json, main_of, parallel, post_json, ratio, run_direct, server, wait_all

FULL = 300
EXPECTED = "499500\n"
PROGRAMS = {  # language id: (share of the class, a program printing sum(range(1000)))
    71: (40, "print(sum(range(1000)))\n"),
    63: (15, "console.log(Array.from({length: 1000}, (_, i) => i).reduce((a, b) => a + b, 0));\n"),
    50: (15, '#include <stdio.h>\nint main(void) { long s = 0; for (int i = 0; i < 1000; i++) s += i;\n'
             '  printf("%ld\\n", s); return 0; }\n'),
    54: (10, '#include <iostream>\nint main() { long s = 0; for (int i = 0; i < 1000; i++) s += i;\n'
             '  std::cout << s << "\\n"; }\n'),
    62: (10, "public class Main { public static void main(String[] a) { long s = 0;\n"
             "  for (int i = 0; i < 1000; i++) s += i; System.out.println(s); } }\n"),
    46: (5, "s=0; for i in $(seq 0 999); do s=$((s + i)); done; echo $s\n"),
    72: (5, "puts (0...1000).sum\n"),
}


def mix(n: int, available: set[int]) -> list[tuple[int, str]]:
    """n (language id, source) pairs in the class's proportions, interleaved as students would post them."""
    langs = [lang for lang in PROGRAMS if lang in available]
    weights = [PROGRAMS[lang][0] for lang in langs]
    out: list[tuple[int, str]] = []
    credit = dict.fromkeys(langs, 0.0)
    for _ in range(n):  # smooth weighted round robin
        for lang, w in zip(langs, weights, strict=True):
            credit[lang] += w
        pick = max(langs, key=lambda lang: credit[lang])
        credit[pick] -= sum(weights)
        out.append((pick, PROGRAMS[pick][1]))
    return out


def burst(api: str, programs: list[tuple[int, str]]) -> dict:
    """POST every program at once; wait for all; timings and outcome counts."""
    t0 = time.perf_counter()

    def post(item: tuple[int, str]) -> tuple[str | int, float]:
        try:
            sub = post_json(api + "/submissions", {"language_id": item[0], "source_code": item[1]})
        except urllib.error.HTTPError as e:  # refused: counted, never retried (a student would see it)
            return e.code, time.perf_counter() - t0
        return sub["token"], time.perf_counter() - t0

    with ThreadPoolExecutor(32) as pool:
        posted = list(pool.map(post, programs))
    tokens = [token for token, _ in posted if isinstance(token, str)]
    refused = collections.Counter(str(code) for code, _ in posted if isinstance(code, int))
    done = wait_all(api, tokens, poll=0.2)
    last = time.perf_counter() - t0
    wrong = [s for s in done.values() if s["status"]["id"] != 3 or s.get("stdout") != EXPECTED]
    return {"posted": len(programs), "created": len(tokens), "refused_by_status": dict(refused),
            "accepted": sum(1 for s in done.values() if s["status"]["id"] == 3 and s.get("stdout") == EXPECTED),
            "wrong": wrong[:5], "lost": len(programs) - len(done), "post_span_s": max(t for _, t in posted),
            "last_finished_s": last}


def direct(programs: list[tuple[int, str]]) -> float:
    """Seconds to compile and run every program directly in the sandbox, as many at once as CPUs."""
    items = iter(programs)

    def one() -> None:
        language_id, source = next(items)
        out = run_direct(language_id, source).decode()
        assert out == EXPECTED, (language_id, out)

    return parallel(one, len(programs))


def run(n: int, tiny: bool = False) -> Result:
    live = server("--max-queue-size", "1000", env={"RUNFLARE_KERNEL_POOL": "{}"})
    try:
        available = {lang["id"] for lang in get_json(live.api + "/languages")}
        programs = mix(len(PROGRAMS) if tiny else n, available)
        for language_id in sorted({lang for lang, _ in programs}):  # each toolchain's first run, off the clock
            post_json(live.api + "/submissions?wait=true", {"language_id": language_id,
                                                             "source_code": PROGRAMS[language_id][1]})
        got = burst(live.api, programs)
    finally:
        live.stop()
    direct([(lang, PROGRAMS[lang][1]) for lang in sorted({x for x, _ in programs})])  # warm, as the server was
    base = direct(programs)
    counts = {str(lang): sum(1 for x, _ in programs if x == lang) for lang in sorted({x for x, _ in programs})}
    rows = [
        Row("burst_last_finished", f"classroom burst: {len(programs)} mixed submissions, last finished",
            got["last_finished_s"], "s", base, f"same programs directly in the sandbox, {os.cpu_count()} at once",
            ratio(got["last_finished_s"], base), "Run-Flare / direct, lower is better", "<= 2"),
        Row("burst_accepted", "classroom burst: submissions accepted (201) and Accepted", got["accepted"], "runs",
            len(programs), "posted", ratio(got["accepted"], len(programs)), "none lost = 1.00", "1.00"),
    ]
    return Result("burst", {"n": len(programs), "languages": counts, "tiny": tiny, "max_queue_size": 1000}, rows,
                  {**got, "direct_s": base})


if __name__ == "__main__":
    main_of("burst", run, __doc__, FULL)
