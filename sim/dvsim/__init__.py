"""The Dataverse Web API simulator, by concern; sim/dataverse_sim.py is the
entry point and sim/README.md has the module map."""
