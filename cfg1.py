import tempfile, yaml, dataclasses
from neuromoe.config import save_config, to_dict, load_family_config
from neuromoe.pipelines.denseformer import load_denseformer_config, DenseFormerConfig
from neuromoe.pipelines.mome import load_mome_config, MoMEConfig
from neuromoe.pipelines.brainmoe import load_brainmoe_config, BrainMoEConfig
L={"denseformer":load_denseformer_config,"mome":load_mome_config,"brainmoe":load_brainmoe_config}
for fam, fn in L.items():
    for preset in ["tiny","demo","paper"]:
        for ov, seed, dev in [([],None,None),(["train.seed=7"],None,None),([],5,"cpu"),(["seed=3"],None,None),(["train.device=cpu"],None,None),(["train.seed=0","seed=4"],None,None), (["pretrain.seed=9"],2,None)]:
            c = fn(preset, ov, seed=seed, device=dev)
            d = tempfile.mkdtemp(); p = save_config(c, d)
            c2 = fn(p)
            c3 = fn(p, seed=None, device=None)
            if to_dict(c)!=to_dict(c2):
                a,b=to_dict(c),to_dict(c2)
                diffs=[(k,a[k],b[k]) for k in a if a[k]!=b[k]]
                print(fam,preset,ov,seed,dev,"DIFF", str(diffs)[:400])
    # cross-family
    for other, fn2 in L.items():
        if other==fam: continue
        c = fn("tiny"); d=tempfile.mkdtemp(); p=save_config(c,d)
        try: fn2(p); print("cross", fam, "->", other, "ACCEPTED")
        except Exception as e: print("cross", fam, "->", other, type(e).__name__, str(e)[:120])
print("done")
