"""brisklm.tasks"""
