"""brisklm.core"""
