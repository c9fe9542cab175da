# Round ao's side measurement: every second, appends to the file named by
# its argument, per command name, the sum over every thread on the machine
# of /proc/<pid>/task/<tid>/schedstat (ns on a core, ns waited for one,
# timeslices). Read two moments of it with round-2026-12-07-ao-sched-window.py.
import os, sys, time, json
# Every second: per command name, summed over all tasks: cpu ns, run-queue wait ns, timeslices.
out = open(sys.argv[1], "w")
while True:
    tot = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try:
            comm = open(f"/proc/{pid}/comm").read().strip()
            tasks = os.listdir(f"/proc/{pid}/task")
        except Exception:
            continue
        if comm.startswith("postgres") or comm.startswith("postmaster"): comm = "postgres"
        for t in tasks:
            try:
                a, b, c = map(int, open(f"/proc/{pid}/task/{t}/schedstat").read().split())
            except Exception:
                continue
            x = tot.setdefault(comm, [0, 0, 0])
            x[0] += a; x[1] += b; x[2] += c
    out.write(json.dumps({"t": time.time(), "p": tot}) + "\n"); out.flush()
    time.sleep(1)
