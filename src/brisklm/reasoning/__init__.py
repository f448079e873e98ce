"""brisklm.reasoning"""
