"""brisklm.zoo"""
