"""Accounts: registration, sign-in, token rotation, password reset, profiles, activity and admin of users."""
