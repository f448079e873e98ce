"""brisklm.analysis"""
