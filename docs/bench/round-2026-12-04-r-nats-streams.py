import asyncio, time, sys, json, nats
from nats.js.api import StreamConfig
async def main(rate, streams, secs=6, pubs=4):
    nc = await nats.connect("nats://127.0.0.1:14222")
    js = nc.jetstream()
    for i in range(streams):
        subj = [f"s.>"] if streams==1 else [f"s.{i}.>"]
        await js.add_stream(StreamConfig(name=f"S{i}", subjects=subj))
    conns=[await nats.connect("nats://127.0.0.1:14222") for _ in range(pubs)]
    lat=[]
    payload=b'x'*500
    async def pub(k):
        j=conns[k].jetstream()
        per=rate/pubs; n=int(per*secs); t0=time.perf_counter()
        tasks=[]
        for m in range(n):
            due=t0+m/per
            d=due-time.perf_counter()
            if d>0: await asyncio.sleep(d)
            async def one(m=m):
                s=time.perf_counter()
                await j.publish(f"s.{k if streams>1 else 0}.{m}", payload)
                lat.append((time.perf_counter()-s)*1000)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    await asyncio.gather(*[pub(k) for k in range(pubs)])
    lat.sort(); n=len(lat)
    print(f"rate {rate} streams {streams}: n {n} p50 {lat[n//2]:.2f} p90 {lat[int(n*.9)]:.2f} p99 {lat[int(n*.99)]:.2f} ms")
    for c in conns: await c.close()
    await nc.close()
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
