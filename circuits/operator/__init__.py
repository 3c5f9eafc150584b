"""The switch operator: guests, listen table, policy, circuit allocation.

It knows the ring (to create circuits) and the control protocol; it never
imports the client API.
"""
