"""brisklm.streaming"""
