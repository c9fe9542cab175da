import asyncio, time, sys, nats
from nats.js.api import StreamConfig, ConsumerConfig, AckPolicy
async def main(rate, streams, consumers, secs=6, pubs=4):
    nc = await nats.connect("nats://127.0.0.1:14222")
    js = nc.jetstream()
    for i in range(streams):
        subj = ["s.>"] if streams==1 else [f"s.{i}.>"]
        await js.add_stream(StreamConfig(name=f"S{i}", subjects=subj))
    stop=False; acked=[0]
    async def consume(ci):
        c = await nats.connect("nats://127.0.0.1:14222"); j=c.jetstream()
        subs=[]
        for i in range(streams):
            subs.append(await j.pull_subscribe("s.>" if streams==1 else f"s.{i}.>", durable=f"c{ci}", stream=f"S{i}"))
        async def run(sub):
            while not stop:
                try: msgs=await sub.fetch(64, timeout=0.5)
                except Exception: continue
                for m in msgs: await m.ack(); acked[0]+=1
        await asyncio.gather(*[run(s) for s in subs])
        await c.close()
    ctasks=[asyncio.create_task(consume(ci)) for ci in range(consumers)]
    await asyncio.sleep(0.5)
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
    print(f"rate {rate} streams {streams} consumers {consumers}: n {n} acked {acked[0]} p50 {lat[n//2]:.2f} p90 {lat[int(n*.9)]:.2f} p99 {lat[int(n*.99)]:.2f} ms")
    stop=True
    await asyncio.sleep(0.6)
    for c in conns: await c.close()
    await nc.close()
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
