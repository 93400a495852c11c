from django.urls import path

from integrations import views

app_name = "integrations"

urlpatterns = [
    path("callback/", views.oauth_callback, name="oauth_callback"),
    path("client-metadata.json", views.client_metadata, name="client_metadata"),
]
