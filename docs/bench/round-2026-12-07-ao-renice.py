# Round ao's experiment, not shipped: every 0.1 s, sets every thread of every
# process named postgres or nats-server on this machine to nice -5 (run as
# root beside `load`: python3 round-2026-12-07-ao-renice.py -5; kill it
# after the run). Threads they start later inherit it.
import os, time, sys
# Every 0.1 s: every thread of every postgres and nats-server process to nice -5.
NICE = int(sys.argv[1]) if len(sys.argv) > 1 else -5
while True:
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try:
            comm = open(f"/proc/{pid}/comm").read().strip()
            if comm not in ("postgres", "nats-server"): continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                t = int(tid)
                if os.getpriority(os.PRIO_PROCESS, t) != NICE:
                    os.setpriority(os.PRIO_PROCESS, t, NICE)
        except Exception:
            pass
    time.sleep(0.1)
