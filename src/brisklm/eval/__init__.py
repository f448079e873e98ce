"""brisklm.eval"""
