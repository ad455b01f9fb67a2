#!/usr/bin/env python3
"""The shape of src/: which top-level modules import which, the import loops among them, and
the imports that run back up the layers below (each layer may use those before it).
Usage: scripts/structure.py [-v]"""
import re, os, sys, collections

# Bottom to top: a module imports only from its own layer and the layers before it.
LAYERS = [
    ["config", "host", "http", "logging", "term"],  # plain data and host resources
    ["arch", "jail"],
    ["thread"],
    ["exec", "rootfs", "boot"],
    ["disk", "net", "mmds", "share", "vsock", "snapshot"],  # backends, state files
    ["devices"],
    ["vmm"],
    ["control", "api"],  # frontends that act on a running VM
    ["cli"],
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
mods = sorted(n[:-3] if n.endswith('.rs') else n for n in os.listdir(root) if n not in ('lib.rs', 'main.rs'))
edges = collections.defaultdict(set); sites = collections.Counter()
for dp, _, fs in os.walk(root):
    if '/rootfs/init' in dp: continue
    for f in fs:
        if not f.endswith('.rs'): continue
        p = os.path.join(dp, f); rel = os.path.relpath(p, root)
        src_mod = rel.split('/')[0].removesuffix('.rs')
        if src_mod in ('lib', 'main'): continue
        text = open(p).read()
        text = re.sub(r'//[^\n]*', '', text)
        targets = set(re.findall(r'crate::(\w+)', text))
        for m in re.finditer(r'crate::\{', text):
            i = m.end(); depth = 1; tok = ''; names = []
            while depth:
                c = text[i]; i += 1
                if c == '{': depth += 1
                elif c == '}': depth -= 1
                if depth == 1 and c not in '{}': tok += c
                if c in ',}' and depth <= 1:
                    pass
            for part in re.split(r',', tok):
                mm = re.match(r'\s*(\w+)', part)
                if mm: names.append(mm.group(1))
            targets |= set(names)
        for t in targets:
            if t in mods and t != src_mod:
                edges[src_mod].add(t); sites[(src_mod, t)] += 1
# Tarjan SCC
idx = {}; low = {}; st = []; on = set(); sccs = []; c = [0]
def sc(v):
    idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
    for w in edges[v]:
        if w not in idx: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        comp = []
        while True:
            w = st.pop(); on.discard(w); comp.append(w)
            if w == v: break
        sccs.append(comp)
sys.setrecursionlimit(10000)
for m in mods:
    if m not in idx: sc(m)
loops = [s for s in sccs if len(s) > 1]
unlayered = [m for m in mods if m not in LAYER]
upward = sorted((a, b) for a in edges for b in edges[a] if a in LAYER and b in LAYER and LAYER[b] > LAYER[a])
print(f"modules: {len(mods)}, module imports: {sum(len(v) for v in edges.values())}")
print(f"imports back up the layers: {len(upward)}", *[f"{a} -> {b}" for a, b in upward])
print(f"import loops: {len(loops)}", *[sorted(l) for l in loops])
if unlayered:
    print("modules in no layer:", *unlayered)
if "-v" in sys.argv:
    for a in sorted(edges):
        print(a, "->", *sorted(edges[a]))
