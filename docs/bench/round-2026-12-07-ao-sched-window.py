# Round ao: per command name, CPU, time waited for a core and timeslices per
# saga between two moments of round-2026-12-07-ao-sched-sample.py's file.
import json, sys
# usage: schedwin.py samples.jsonl t0 t1 sagas
rows = [json.loads(l) for l in open(sys.argv[1])]
t0, t1, n = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
a = min(rows, key=lambda r: abs(r["t"] - t0)); b = min(rows, key=lambda r: abs(r["t"] - t1))
secs = b["t"] - a["t"]
print(f"window {secs:.1f} s, {n:.0f} sagas ({n/secs:.0f}/s)")
tc = tw = 0
for comm in sorted(b["p"], key=lambda c: -(b["p"][c][1] - a["p"].get(c, [0,0,0])[1])):
    x = b["p"][comm]; y = a["p"].get(comm, [0, 0, 0])
    cpu, wait, sl = (x[0]-y[0])/1e6, (x[1]-y[1])/1e6, x[2]-y[2]
    if cpu < 1 and wait < 1: continue
    tc += cpu; tw += wait
    print(f"{comm:16s} cpu {cpu/n:6.2f} ms/saga  wait {wait/n:6.2f} ms/saga  slices {sl/n:6.1f}/saga  wait/slice {wait/max(sl,1)*1000:6.0f} us")
print(f"{'all':16s} cpu {tc/n:6.2f} ms/saga  wait {tw/n:6.2f} ms/saga  (cores busy {tc/1000/secs:.2f}, waiting {tw/1000/secs:.2f})")
