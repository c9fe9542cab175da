# publish latency, one stream, plain publishes vs atomic batches of B rows
import asyncio, time, sys, json, uuid, nats
async def main(rate, batch, secs=6, pubs=4):
    nc = await nats.connect("nats://127.0.0.1:14222")
    cfg={"name":"S0","subjects":["s.>"],"storage":"file","allow_atomic":True,"duplicate_window":120000000000}
    r=await nc.request("$JS.API.STREAM.CREATE.S0", json.dumps(cfg).encode(), timeout=5)
    assert b'error' not in r.data, r.data
    conns=[await nats.connect("nats://127.0.0.1:14222") for _ in range(pubs)]
    lat=[]; payload=b'x'*500
    async def pub(k):
        c=conns[k]; j=c.jetstream()
        per=rate/pubs/batch; n=int(per*secs); t0=time.perf_counter(); tasks=[]
        for m in range(n):
            due=t0+m/per; d=due-time.perf_counter()
            if d>0: await asyncio.sleep(d)
            async def one(m=m):
                s=time.perf_counter()
                if batch==1:
                    await j.publish(f"s.{k}.{m}", payload, headers={"Nats-Msg-Id":str(uuid.uuid4())})
                else:
                    bid=str(uuid.uuid4())
                    for i in range(1,batch):
                        await c.publish(f"s.{k}.{m}", payload, headers={"Nats-Msg-Id":str(uuid.uuid4()),"Nats-Batch-Id":bid,"Nats-Batch-Sequence":str(i)})
                    r=await c.request(f"s.{k}.{m}", payload, timeout=10, headers={"Nats-Msg-Id":str(uuid.uuid4()),"Nats-Batch-Id":bid,"Nats-Batch-Sequence":str(batch),"Nats-Batch-Commit":"1"})
                    assert b'error' not in r.data, r.data
                for _ in range(batch): lat.append((time.perf_counter()-s)*1000)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    await asyncio.gather(*[pub(k) for k in range(pubs)])
    lat.sort(); n=len(lat)
    print(f"rate {rate} batch {batch}: n {n} p50 {lat[n//2]:.2f} p90 {lat[int(n*.9)]:.2f} p99 {lat[int(n*.99)]:.2f} ms")
    for c in conns: await c.close()
    await nc.close()
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
