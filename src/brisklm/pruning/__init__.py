"""brisklm.pruning"""
