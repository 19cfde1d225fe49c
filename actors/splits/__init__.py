"""Dense layer splits: a model bigger than one node, served by its head over stages on peers.

- `_plan`    the pure planner: layer sizes and offered room -> members and their layers.
- `_head`    the split head actor: plans, leases stages, tunnels, drives its managed worker.
- `_stage`   the stage host actor: grants and fences leases, runs the RPC server child.
- `_tunnel`  llama.cpp RPC byte streams over the mesh's ZeroMQ links (STREAM sockets at both ends).
"""
