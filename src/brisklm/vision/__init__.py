"""brisklm.vision"""
